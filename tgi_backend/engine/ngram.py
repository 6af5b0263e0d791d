"""N-gram speculation (TGI's --speculate without a draft model; "prompt lookup"): the tokens that followed the
latest earlier occurrence of a request's last n tokens are proposed as its next ones. Ints only, no torch.

Each request's tokens are kept as a byte string of 4-byte ids, so the search is one `bytes.rfind` in C.
"""
from __future__ import annotations

from array import array
from typing import Collection

MAX_NGRAM = 3  # the longest suffix matched first, then shorter ones down to one token


class NgramDrafter:
    def __init__(self, max_ngram: int = MAX_NGRAM) -> None:
        self.max_ngram = max_ngram
        self._tokens: dict[str, bytearray] = {}  # request id -> its token ids as int32 bytes

    def propose(
        self, request_id: str, token_ids: list[int], k: int, never: Collection[int] = ()
    ) -> list[int]:
        """Up to k draft tokens after token_ids; cut before the first token in `never` (ids that would end
        the request: a verified draft must not finish it before its last token)."""
        if k <= 0 or len(token_ids) < 2:
            return []
        buf = self._sync(request_id, token_ids)
        n_tokens = len(token_ids)
        for n in range(min(self.max_ngram, n_tokens - 1), 0, -1):
            start = self._rfind(buf, buf[-4 * n :], 4 * (n_tokens - 1))  # an occurrence ending before the last
            if start < 0:
                continue
            begin = start // 4 + n
            period = n_tokens - begin  # the suffix recurs this far back: a loop goes on with the same period
            draft = [token_ids[begin + j % period] for j in range(k)]
            for i, t in enumerate(draft):
                if t in never:
                    return draft[:i]
            return draft
        return []

    def forget(self, request_id: str) -> None:
        self._tokens.pop(request_id, None)

    def _sync(self, request_id: str, token_ids: list[int]) -> bytearray:
        buf = self._tokens.get(request_id)
        if buf is None:
            buf = self._tokens[request_id] = bytearray()
        have = len(buf) // 4
        if have > len(token_ids):  # a reused id with other tokens: start over
            del buf[:]
            have = 0
        if have < len(token_ids):
            buf += array("i", token_ids[have:]).tobytes()
        return buf

    @staticmethod
    def _rfind(buf: bytearray, pattern: bytes, end: int) -> int:
        """The last 4-byte aligned occurrence of pattern ending at or before `end` bytes; -1 if none."""
        while True:
            i = buf.rfind(pattern, 0, end)
            if i < 0 or i % 4 == 0:
                return i
            end = i + len(pattern) - 1  # misaligned: look again left of it
