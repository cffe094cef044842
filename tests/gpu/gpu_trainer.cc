// A stand-in trainer whose state lives in device memory (tests/gpu/gpu_state.h), for the GPU
// kill tests. Registers the seeded state with the local tesserad, restores the newest sealed
// step if there is one and checks every byte on the device, then "trains": each step fences the
// compute stream on the snapshot copies, runs the optimizer kernels that move every byte to the
// next step, snapshots every --every steps and synchronises the stream (as a loss read would).
// One flushed line per event, as tests/trainer.cc:
//   restore_ms T | resumed S | fresh | snapshot S (printed before the call) | skipped S |
//   sealed S | verified S | done | error: ...
#include <cuda_runtime_api.h>

#include <chrono>
#include <cstdio>
#include <map>
#include <string>
#include <thread>

#include "absl/strings/numbers.h"
#include "agent/client.h"
#include "common/logging.h"
#include "tests/gpu/gpu_state.h"

namespace {

struct Flags {
  std::string socket, job = "gpu-trainer-job", mode = "train", when_busy = "skip",
              staging = "adaptive";
  uint64_t seed = 1, tensors = 8, min_bytes = 1, max_bytes = 1 << 20, total_bytes = 64 << 20;
  uint64_t steps = 0, every = 1, step_sleep_ms = 0, device = 0;
};

bool Parse(int argc, char** argv, Flags* f) {
  std::map<std::string, uint64_t*> numbers = {
      {"seed", &f->seed},           {"tensors", &f->tensors},     {"min-bytes", &f->min_bytes},
      {"max-bytes", &f->max_bytes}, {"total-bytes", &f->total_bytes}, {"steps", &f->steps},
      {"every", &f->every},         {"step-sleep-ms", &f->step_sleep_ms}, {"device", &f->device}};
  std::map<std::string, std::string*> strings = {
      {"socket", &f->socket}, {"job", &f->job}, {"mode", &f->mode}, {"when-busy", &f->when_busy},
      {"staging", &f->staging}};
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const size_t eq = arg.find('=');
    if (arg.rfind("--", 0) != 0 || eq == std::string::npos) {
      std::fprintf(stderr, "gpu_trainer: bad argument '%s' (expected --key=value)\n", argv[i]);
      return false;
    }
    const std::string key = arg.substr(2, eq - 2), value = arg.substr(eq + 1);
    if (numbers.count(key)) {
      if (!absl::SimpleAtoi(value, numbers[key])) {
        std::fprintf(stderr, "gpu_trainer: --%s needs a number, got '%s'\n", key.c_str(),
                     value.c_str());
        return false;
      }
    } else if (strings.count(key)) {
      *strings[key] = value;
    } else {
      std::fprintf(stderr, "gpu_trainer: unknown flag --%s\n", key.c_str());
      return false;
    }
  }
  if (f->socket.empty() || (f->mode != "train" && f->mode != "verify") || f->every == 0) {
    std::fprintf(stderr, "gpu_trainer: need --socket, --mode=train|verify and --every>0\n");
    return false;
  }
  return true;
}

void Say(const std::string& line) {
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

int Fail(const std::string& what, const absl::Status& status) {
  Say("error: " + what + ": " + status.ToString());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  using tessera::testing::gpu::GpuLayout;
  using tessera::testing::gpu::GpuState;
  Flags f;
  if (!Parse(argc, argv, &f)) return 2;
  tessera::SetLogLevel("warn").IgnoreError();
  if (std::string why = tessera::testing::gpu::NoGpuReason(); !why.empty()) {
    return Fail("gpu", absl::FailedPreconditionError(why));
  }
  cudaSetDevice(static_cast<int>(f.device));
  cudaStream_t stream = nullptr;
  if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess) {
    return Fail("stream", absl::InternalError(cudaGetErrorName(cudaGetLastError())));
  }

  tessera::Client::Options options;
  options.socket_path = f.socket;
  options.use_gpu = true;
  options.device = static_cast<int>(f.device);
  options.when_busy = f.when_busy == "wait" ? tessera::Client::BusyPolicy::kWait
                                            : tessera::Client::BusyPolicy::kSkip;
  auto staging = tessera::cuda::ParseStagingMode(f.staging);
  if (!staging.ok()) return Fail("--staging", staging.status());
  options.staging.mode = *staging;
  auto client = tessera::Client::Connect(options);
  if (!client.ok()) return Fail("connect", client.status());

  GpuLayout layout{f.seed, static_cast<int>(f.tensors), f.min_bytes, f.max_bytes, f.total_bytes};
  auto state_or = GpuState::Create(layout, stream);
  if (!state_or.ok()) return Fail("allocate", state_or.status());
  GpuState& state = **state_or;
  if (absl::Status s = state.Scramble(f.seed * 7 + 3); !s.ok()) return Fail("scramble", s);
  if (cudaStreamSynchronize(stream) != cudaSuccess) {
    return Fail("scramble", absl::InternalError(cudaGetErrorName(cudaGetLastError())));
  }
  absl::Status registered = (*client)->Register(f.job, 0, 1, state.ClientEntries());
  if (!registered.ok()) return Fail("register", registered);
  if ((*client)->stats().engine.rfind("cuda", 0) != 0) {
    return Fail("engine", absl::FailedPreconditionError("the client's copy engine is " +
                                                        (*client)->stats().engine));
  }

  int64_t step = 0;
  const auto restore_start = std::chrono::steady_clock::now();
  auto restored = (*client)->Restore(-1);
  if (restored.ok()) {
    Say("restore_ms " + std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(
                                           std::chrono::steady_clock::now() - restore_start)
                                           .count()));
    auto diff = state.Check(*restored);
    if (!diff.ok()) return Fail("check", diff.status());
    if (!diff->empty()) {
      Say("error: MISMATCH after restoring step " + std::to_string(*restored) + ": " + *diff);
      return 3;
    }
    step = *restored;
    Say("resumed " + std::to_string(step));
  } else if (absl::IsNotFound(restored.status())) {
    if (absl::Status s = state.Fill(0); !s.ok()) return Fail("fill", s);
    Say("fresh");
  } else {
    return Fail("restore", restored.status());
  }
  if (f.mode == "verify") {
    Say("verified " + std::to_string(step));
    return 0;
  }

  int64_t announced_sealed = -1;
  for (uint64_t n = 0; f.steps == 0 || n < f.steps; ++n) {
    // The optimizer step must not overtake the copies of the last snapshot.
    if (absl::Status fenced = (*client)->Fence(stream); !fenced.ok()) return Fail("fence", fenced);
    if (absl::Status s = state.Advance(step, step + 1); !s.ok()) return Fail("optimizer", s);
    ++step;
    if (step % static_cast<int64_t>(f.every) == 0) {
      Say("snapshot " + std::to_string(step));  // before the call: bounds what can be sealed
      auto outcome = (*client)->Snapshot(step, stream);
      if (!outcome.ok()) return Fail("snapshot", outcome.status());
      if (*outcome == tessera::Client::SnapshotOutcome::kSkipped) {
        Say("skipped " + std::to_string(step));
      }
    }
    const int64_t sealed = (*client)->stats().last_sealed_step;
    if (sealed > announced_sealed) {
      announced_sealed = sealed;
      Say("sealed " + std::to_string(sealed));
    }
    if (cudaStreamSynchronize(stream) != cudaSuccess) {
      return Fail("step", absl::InternalError(cudaGetErrorName(cudaGetLastError())));
    }
    if (f.step_sleep_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(f.step_sleep_ms));
  }
  absl::Status last = (*client)->Wait();
  if (!last.ok()) return Fail("last snapshot", last);
  Say("sealed " + std::to_string((*client)->stats().last_sealed_step));
  auto diff = state.Check(step);
  if (!diff.ok() || !diff->empty()) {
    Say("error: the state after training is not that of step " + std::to_string(step));
    return 3;
  }
  Say("done");
  return 0;
}
