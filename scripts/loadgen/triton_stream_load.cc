// The served load of scripts/bench_serving.py in C++: every request over one ModelStreamInfer stream (multiplexed
// by request id), asking only for `output_ids`, as perf_analyzer drives a decoupled model: a check that the
// served figures do not hang on the Python client's CPU (~0.17 ms a response on the cores the server uses too).
//
//   triton_stream_load HOST:PORT MODEL REQUESTS_FILE
//
// REQUESTS_FILE, little-endian uint32: count, then per request max_tokens, n, n int32 token ids.
// Prints, once every request ended (nothing is written during the load): "start NS", then per response that
// carried tokens "R NTOKENS NS", per request end "final R", and "error MESSAGE" if the stream reported one. NS is
// CLOCK_MONOTONIC in nanoseconds (Python's time.monotonic_ns()). Build: scripts/setup_peers.sh loadgen.
#include <grpcpp/grpcpp.h>
#include <time.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "grpc_service.grpc.pb.h"

namespace {

int64_t now_ns() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

uint32_t read_u32(std::ifstream& in) {
    uint32_t v = 0;
    in.read(reinterpret_cast<char*>(&v), 4);
    return v;
}

std::string bytes_element(const std::string& text) {  // one BYTES element: 4-byte length, then the bytes
    const uint32_t n = uint32_t(text.size());
    return std::string(reinterpret_cast<const char*>(&n), 4) + text;
}

inference::ModelInferRequest make_request(const std::string& model, uint32_t id, uint32_t max_tokens,
                                          const std::vector<int32_t>& ids) {
    inference::ModelInferRequest r;
    r.set_model_name(model);
    r.set_id(std::to_string(id));
    (*r.mutable_parameters())["triton_enable_empty_final_response"].set_bool_param(true);
    auto add = [&](const char* name, const char* type, int64_t dim, std::string data) {
        auto* t = r.add_inputs();
        t->set_name(name);
        t->set_datatype(type);
        t->add_shape(dim);
        r.add_raw_input_contents(std::move(data));
    };
    add("input_ids", "INT32", int64_t(ids.size()),
        std::string(reinterpret_cast<const char*>(ids.data()), ids.size() * sizeof(int32_t)));
    add("stream", "BOOL", 1, std::string(1, '\x01'));
    add("sampling_parameters", "BYTES", 1,
        bytes_element("{\"max_tokens\": " + std::to_string(max_tokens) + ", \"ignore_eos\": true}"));
    r.add_outputs()->set_name("output_ids");
    return r;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 4) {
        std::cerr << "usage: triton_stream_load HOST:PORT MODEL REQUESTS_FILE\n";
        return 2;
    }
    std::ifstream in(argv[3], std::ios::binary);
    const uint32_t count = read_u32(in);
    std::vector<inference::ModelInferRequest> requests;
    for (uint32_t i = 0; i < count; i++) {
        const uint32_t max_tokens = read_u32(in), n = read_u32(in);
        std::vector<int32_t> ids(n);
        in.read(reinterpret_cast<char*>(ids.data()), std::streamsize(n) * 4);
        requests.push_back(make_request(argv[2], i, max_tokens, ids));
    }
    if (!in) {
        std::cerr << "truncated requests file\n";
        return 2;
    }
    auto stub = inference::GRPCInferenceService::NewStub(
        grpc::CreateChannel(argv[1], grpc::InsecureChannelCredentials()));
    grpc::ClientContext context;
    auto stream = stub->ModelStreamInfer(&context);
    struct Record { uint32_t request, tokens; int64_t ns; };
    std::vector<Record> records;  // tokens == UINT32_MAX: the request's end
    records.reserve(size_t(count) * 64);
    std::string error;
    const int64_t start = now_ns();
    std::thread writer([&] {  // the stream stays open until every request ended
        for (const auto& r : requests)
            if (!stream->Write(r)) return;
    });
    inference::ModelStreamInferResponse message;
    uint32_t left = count;
    while (left > 0 && stream->Read(&message)) {
        if (!message.error_message().empty()) {
            error = message.error_message();
            break;
        }
        const auto& response = message.infer_response();
        char* end = nullptr;
        const unsigned long id = std::strtoul(response.id().c_str(), &end, 10);
        if (response.id().empty() || *end != '\0' || id >= count) continue;  // not one of ours
        if (response.raw_output_contents_size() > 0) {
            const auto n = uint32_t(response.raw_output_contents(0).size() / 4);
            if (n) records.push_back({uint32_t(id), n, now_ns()});
        }
        auto it = response.parameters().find("triton_final_response");
        if (it != response.parameters().end() && it->second.bool_param()) {
            records.push_back({uint32_t(id), UINT32_MAX, 0});
            left--;
        }
    }
    context.TryCancel();  // first: a writer blocked by flow control after an error returns
    writer.join();
    const grpc::Status status = stream->Finish();
    if (left > 0 && !status.ok()) std::cerr << "stream ended: " << status.error_message() << "\n";
    std::printf("start %lld\n", static_cast<long long>(start));
    for (const auto& r : records) {
        if (r.tokens == UINT32_MAX)
            std::printf("final %u\n", r.request);
        else
            std::printf("%u %u %lld\n", r.request, r.tokens, static_cast<long long>(r.ns));
    }
    if (!error.empty()) std::printf("error %s\n", error.c_str());
    return left == 0 ? 0 : 1;
}
