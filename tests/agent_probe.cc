// Calls one agent RPC on a daemon's socket, as whatever uid runs it, and prints the outcome:
// "OK step S" or "<CODE>: <message>". Tests run it under setpriv as another uid, to see what a
// user allowed on the socket may do to a job that is not theirs.
//
//   agent_probe --socket=PATH --call=prepare_restore|find_latest|corrupt|drop_memory|
//                                    read_manifest|read_range --job=J
//               [--rank=R] [--world=W] [--step=S] [--resume] [--node=N] [--entry=E]
// (corrupt and drop_memory are admin calls on the same socket; drop_memory confirms --node;
// read_manifest and read_range go through the client library's reader, Client::ReadManifest
// and a one-byte Client::ReadRange of --entry.)
#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "agent/client.h"
#include "common/grpc_status.h"
#include "grpcpp/create_channel.h"
#include "proto/admin.grpc.pb.h"
#include "proto/agent.grpc.pb.h"

namespace {

bool Flag(const std::string& arg, const char* name, std::string* value) {
  const std::string prefix = std::string("--") + name + "=";
  if (!absl::StartsWith(arg, prefix)) return false;
  *value = arg.substr(prefix.size());
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  std::string socket, call, job, rank = "0", world = "1", step = "-1", node, entry;
  bool resume = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (Flag(arg, "socket", &socket) || Flag(arg, "call", &call) || Flag(arg, "job", &job) ||
        Flag(arg, "rank", &rank) || Flag(arg, "world", &world) || Flag(arg, "step", &step) ||
        Flag(arg, "node", &node) || Flag(arg, "entry", &entry)) {
      continue;
    }
    if (arg == "--resume") {
      resume = true;
      continue;
    }
    std::fprintf(stderr, "agent_probe: unknown argument %s\n", arg.c_str());
    return 2;
  }
  uint32_t rank_n = 0, world_n = 0;
  int64_t step_n = 0;
  if (socket.empty() || job.empty() || !absl::SimpleAtoi(rank, &rank_n) ||
      !absl::SimpleAtoi(world, &world_n) || !absl::SimpleAtoi(step, &step_n)) {
    std::fprintf(stderr, "agent_probe: --socket and --job are required; --rank, --world and "
                         "--step are integers\n");
    return 2;
  }
  auto channel = grpc::CreateChannel("unix:" + socket, grpc::InsecureChannelCredentials());
  auto stub = tessera::agent::Agent::NewStub(channel);
  auto admin = tessera::admin::Admin::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  grpc::Status status;
  int64_t answer = -1;
  absl::Status read_status;  // of the reader's calls
  if (call == "read_manifest" || call == "read_range") {
    tessera::Client::Options options;
    options.socket_path = socket;
    options.use_gpu = false;
    auto client = tessera::Client::Connect(options);
    read_status = client.status();
    if (client.ok() && call == "read_manifest") {
      absl::StatusOr<tessera::ShardManifest> manifest =
          (*client)->ReadManifest(job, rank_n, step_n);
      read_status = manifest.status();
      if (manifest.ok()) answer = manifest->step();
    } else if (client.ok()) {
      char byte;
      read_status = (*client)->ReadRange(job, rank_n, step_n, entry, 0, 1, &byte);
      answer = step_n;
    }
  } else if (call == "prepare_restore") {
    tessera::agent::PrepareRestoreRequest request;
    request.set_job_id(job);
    request.set_rank(rank_n);
    request.set_step(step_n);
    tessera::agent::PrepareRestoreResponse response;
    status = stub->PrepareRestore(&context, request, &response);
    answer = response.step();
  } else if (call == "find_latest") {
    tessera::agent::FindLatestRestorableRequest request;
    request.set_job_id(job);
    request.set_rank(rank_n);
    request.set_world_size(world_n);
    request.set_resume(resume);
    tessera::agent::FindLatestRestorableResponse response;
    status = stub->FindLatestRestorable(&context, request, &response);
    answer = response.step();
  } else if (call == "corrupt") {
    tessera::admin::CorruptRequest request;
    request.set_job_id(job);
    request.set_rank(rank_n);
    request.set_target(tessera::admin::CorruptRequest::SLOT);
    request.set_yes(true);
    tessera::admin::CorruptResponse response;
    status = admin->Corrupt(&context, request, &response);
  } else if (call == "drop_memory") {
    tessera::admin::DropMemoryRequest request;
    request.set_confirm_node_id(node);
    tessera::admin::DropMemoryResponse response;
    status = admin->DropMemory(&context, request, &response);
  } else {
    std::fprintf(stderr, "agent_probe: --call must be prepare_restore, find_latest, corrupt, "
                         "drop_memory, read_manifest or read_range\n");
    return 2;
  }
  const absl::Status s = read_status.ok() ? tessera::FromGrpcStatus(status) : read_status;
  if (s.ok()) {
    std::printf("OK step %lld\n", static_cast<long long>(answer));
  } else {
    std::printf("%s\n", s.ToString().c_str());
  }
  return 0;
}
