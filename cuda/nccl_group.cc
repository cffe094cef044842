#include "cuda/nccl_group.h"

#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <nccl.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/logging.h"
#include "common/status.h"

namespace tessera::cuda {
namespace {

// The entry points the agent uses, resolved from the loaded library.
struct NcclApi {
  absl::Status loaded = absl::FailedPreconditionError("not loaded");
  std::string version;
  ncclResult_t (*GetVersion)(int*) = nullptr;
  ncclResult_t (*GetUniqueId)(ncclUniqueId*) = nullptr;
  ncclResult_t (*CommInitRankConfig)(ncclComm_t*, int, ncclUniqueId, int, ncclConfig_t*) = nullptr;
  ncclResult_t (*CommGetAsyncError)(ncclComm_t, ncclResult_t*) = nullptr;
  ncclResult_t (*CommAbort)(ncclComm_t) = nullptr;
  ncclResult_t (*CommDestroy)(ncclComm_t) = nullptr;
  ncclResult_t (*Broadcast)(const void*, void*, size_t, ncclDataType_t, int, ncclComm_t,
                            cudaStream_t) = nullptr;
  ncclResult_t (*GroupStart)() = nullptr;
  ncclResult_t (*GroupEnd)() = nullptr;
  const char* (*GetErrorString)(ncclResult_t) = nullptr;
  const char* (*GetLastError)(ncclComm_t) = nullptr;
};

template <typename F>
bool Resolve(void* handle, const char* name, F* out) {
  *out = reinterpret_cast<F>(dlsym(handle, name));
  return *out != nullptr;
}

const NcclApi& Api() {
  static NcclApi* api = [] {
    auto* a = new NcclApi();
    const char* configured = std::getenv("TESSERA_NCCL_LIBRARY");
    const std::string path = configured != nullptr && *configured ? configured : "libnccl.so.2";
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL);
    if (handle == nullptr) {
      const char* why = dlerror();
      a->loaded = absl::FailedPreconditionError(absl::StrCat(
          "NCCL is not available: dlopen(", path, ") failed: ", why != nullptr ? why : "?",
          " (set TESSERA_NCCL_LIBRARY to libnccl.so.2's path, or import torch first)"));
      return a;
    }
    bool ok = Resolve(handle, "ncclGetVersion", &a->GetVersion) &&
              Resolve(handle, "ncclGetUniqueId", &a->GetUniqueId) &&
              Resolve(handle, "ncclCommInitRankConfig", &a->CommInitRankConfig) &&
              Resolve(handle, "ncclCommGetAsyncError", &a->CommGetAsyncError) &&
              Resolve(handle, "ncclCommAbort", &a->CommAbort) &&
              Resolve(handle, "ncclCommDestroy", &a->CommDestroy) &&
              Resolve(handle, "ncclBroadcast", &a->Broadcast) &&
              Resolve(handle, "ncclGroupStart", &a->GroupStart) &&
              Resolve(handle, "ncclGroupEnd", &a->GroupEnd) &&
              Resolve(handle, "ncclGetErrorString", &a->GetErrorString) &&
              Resolve(handle, "ncclGetLastError", &a->GetLastError);
    if (!ok) {
      a->loaded = absl::FailedPreconditionError(absl::StrCat(
          path, " lacks an entry point the agent needs (NCCL 2.14 or newer is required)"));
      return a;
    }
    int v = 0;
    a->GetVersion(&v);
    // NCCL_VERSION(X,Y,Z) is X*10000 + Y*100 + Z since 2.9.
    a->version = absl::StrCat(v / 10000, ".", (v / 100) % 100, ".", v % 100);
    if (v < 21400) {
      a->loaded = absl::FailedPreconditionError(absl::StrCat(
          path, " is NCCL ", a->version, "; non-blocking communicators need 2.14 or newer"));
      return a;
    }
    a->loaded = absl::OkStatus();
    Logger("nccl")->info("loaded {} (NCCL {})", path, a->version);
    return a;
  }();
  return *api;
}

absl::Status NcclError(const NcclApi& api, ncclResult_t result, ncclComm_t comm,
                       const std::string& what) {
  const char* last = comm != nullptr ? api.GetLastError(comm) : nullptr;
  return absl::InternalError(absl::StrCat(what, ": ", api.GetErrorString(result),
                                          last != nullptr && *last ? absl::StrCat(" (", last, ")")
                                                                   : ""));
}

// Waits for a non-blocking communicator's pending work: OK, an NCCL error, or the deadline.
absl::Status AwaitComm(const NcclApi& api, ncclComm_t comm, absl::Time deadline,
                       const std::string& what) {
  while (true) {
    ncclResult_t state = ncclSuccess;
    ncclResult_t r = api.CommGetAsyncError(comm, &state);
    if (r != ncclSuccess) return NcclError(api, r, comm, what);
    if (state == ncclSuccess) return absl::OkStatus();
    if (state != ncclInProgress) return NcclError(api, state, comm, what);
    if (absl::Now() > deadline) {
      return absl::DeadlineExceededError(absl::StrCat(what, ": not finished in time (a member "
                                                      "did not join, or the link stalled)"));
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

absl::Status Cuda(cudaError_t e, const std::string& what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorName(e), " (",
                                          cudaGetErrorString(e), ")"));
}

}  // namespace

absl::Status NcclAvailable() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    cudaGetLastError();
    return absl::FailedPreconditionError("NCCL is not used: no CUDA device");
  }
  return Api().loaded;
}

std::string NcclVersion() { return Api().loaded.ok() ? Api().version : ""; }

absl::StatusOr<std::string> NcclUniqueId() {
  const NcclApi& api = Api();
  TESSERA_RETURN_IF_ERROR(api.loaded);
  ncclUniqueId id;
  ncclResult_t r = api.GetUniqueId(&id);
  if (r != ncclSuccess) return NcclError(api, r, nullptr, "ncclGetUniqueId");
  return std::string(id.internal, sizeof(id.internal));
}

absl::Status NcclBroadcast(const std::string& unique_id, int rank, int size, int device,
                           const std::vector<BroadcastOp>& ops, absl::Duration timeout) {
  const NcclApi& api = Api();
  TESSERA_RETURN_IF_ERROR(api.loaded);
  ncclUniqueId id;
  if (unique_id.size() != sizeof(id.internal)) {
    return absl::InvalidArgumentError(absl::StrCat("an NCCL unique id is ", sizeof(id.internal),
                                                   " bytes, got ", unique_id.size()));
  }
  if (size < 1 || rank < 0 || rank >= size) {
    return absl::InvalidArgumentError(absl::StrCat("NCCL rank ", rank, " of ", size));
  }
  for (const BroadcastOp& op : ops) {
    if (op.root < 0 || op.root >= size) {
      return absl::InvalidArgumentError(absl::StrCat("broadcast root ", op.root, " of ", size));
    }
  }
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  const absl::Time deadline = absl::Now() + timeout;
  if (device < 0) TESSERA_RETURN_IF_ERROR(Cuda(cudaGetDevice(&device), "cudaGetDevice"));
  TESSERA_RETURN_IF_ERROR(Cuda(cudaSetDevice(device), absl::StrCat("cudaSetDevice(", device, ")")));
  cudaStream_t stream = nullptr;
  TESSERA_RETURN_IF_ERROR(Cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
                               "cudaStreamCreate"));
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  const std::string init_what = absl::StrCat("ncclCommInitRankConfig(rank ", rank, " of ", size,
                                             ", device ", device, ")");
  absl::Status status;
  ncclResult_t r = api.CommInitRankConfig(&comm, size, id, rank, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    status = NcclError(api, r, comm, init_what);
  } else {
    status = AwaitComm(api, comm, deadline, init_what);
  }
  // Groups of at most kOpsPerGroup broadcasts: one launch each, well inside NCCL's limits on
  // the operations one group may aggregate.
  constexpr size_t kOpsPerGroup = 256;
  for (size_t first = 0; status.ok() && first < ops.size(); first += kOpsPerGroup) {
    const size_t last = std::min(ops.size(), first + kOpsPerGroup);
    r = api.GroupStart();
    for (size_t i = first; i < last && (r == ncclSuccess || r == ncclInProgress); ++i) {
      r = api.Broadcast(ops[i].data, ops[i].data, ops[i].bytes, ncclUint8, ops[i].root, comm,
                        stream);
    }
    ncclResult_t end = api.GroupEnd();
    if (r != ncclSuccess && r != ncclInProgress) {
      status = NcclError(api, r, comm, "ncclBroadcast");
    } else if (end != ncclSuccess && end != ncclInProgress) {
      status = NcclError(api, end, comm, "ncclGroupEnd");
    } else {
      status = AwaitComm(api, comm, deadline, "ncclGroupEnd");
    }
  }
  while (status.ok()) {
    cudaError_t e = cudaStreamQuery(stream);
    if (e == cudaSuccess) break;
    if (e != cudaErrorNotReady) {
      status = Cuda(e, "the broadcasts' stream");
    } else if (absl::Now() > deadline) {
      status = absl::DeadlineExceededError("NCCL broadcasts did not finish in time");
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }
  if (comm != nullptr) {
    // A failed or late communicator is aborted, so nothing waits on the missing member.
    if (status.ok()) {
      api.CommDestroy(comm);
    } else {
      api.CommAbort(comm);
    }
  }
  cudaStreamDestroy(stream);
  return status;
}

}  // namespace tessera::cuda
