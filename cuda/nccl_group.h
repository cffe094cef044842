// NCCL for the agent's restore: broadcasts of device memory within a communicator the agent
// creates itself (no framework handle needed), from a unique id its ranks share through the
// daemons' rendezvous.
//
// libnccl is loaded with dlopen when first needed (TESSERA_NCCL_LIBRARY, else "libnccl.so.2":
// the one a process that imported PyTorch already has loaded, or one on the library path), so
// builds and hosts without NCCL load and fall back: Available() says why not.
//
//   std::string id = *NcclUniqueId();                 // on one rank, shared with the others
//   NcclBroadcast(id, rank, size, device, ops, timeout);  // on every rank, the same ops
//
// Every wait has a deadline: the communicator is created non-blocking and aborted when it or the
// broadcasts do not finish in time (a member that never arrives cannot hang the restore).
#ifndef TESSERA_CUDA_NCCL_GROUP_H_
#define TESSERA_CUDA_NCCL_GROUP_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace tessera::cuda {

// OK when libnccl loads and a CUDA device is usable; otherwise why not (kFailedPrecondition).
absl::Status NcclAvailable();

// The loaded library's version, e.g. "2.21.5"; empty when not loaded.
std::string NcclVersion();

// A fresh unique id (NCCL_UNIQUE_ID_BYTES bytes) for a new communicator.
absl::StatusOr<std::string> NcclUniqueId();

// Broadcast `bytes` at `data` (device memory) from the member `root` to every member.
struct BroadcastOp {
  void* data = nullptr;
  uint64_t bytes = 0;
  int root = 0;
};

// Creates a communicator of `size` members from `unique_id` as member `rank` on CUDA `device`,
// runs `ops` (the same list, in the same order, on every member) as one group, waits for them
// and destroys the communicator. kDeadlineExceeded when it does not finish within `timeout`
// (the communicator is aborted); NCCL errors carry NCCL's message.
absl::Status NcclBroadcast(const std::string& unique_id, int rank, int size, int device,
                           const std::vector<BroadcastOp>& ops, absl::Duration timeout);

}  // namespace tessera::cuda

#endif  // TESSERA_CUDA_NCCL_GROUP_H_
