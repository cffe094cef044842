// Checks the blocks of a restore's source against their recorded CRC32C on a few threads, ahead
// of the copies that wait for them, so that a block is verified before it is copied while the
// copy of the block before it runs.
//
//   BlockVerifier verifier(blocks, 4);
//   engine->CopySyncChecked(ops, [&](size_t op, uint64_t offset, uint64_t bytes) {
//     return verifier.WaitFor(op, offset, bytes);   // kDataLoss naming the first bad block
//   });
//
// Blocks are verified in the order given; give them in the order the copies will ask.
#ifndef TESSERA_AGENT_BLOCK_VERIFIER_H_
#define TESSERA_AGENT_BLOCK_VERIFIER_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace tessera {

class BlockVerifier {
 public:
  struct Block {
    size_t op;        // the copy op it belongs to
    uint64_t offset;  // within the op
    const void* data;
    uint64_t bytes;
    uint32_t expected_crc32c;
  };

  // Starts `threads` threads (at least 1) verifying `blocks`. `what` names the source in errors
  // ("rank 3 step 120").
  BlockVerifier(std::vector<Block> blocks, int threads, std::string what);
  // Stops verifying (blocks not reached are left unchecked) and joins the threads.
  ~BlockVerifier();
  BlockVerifier(const BlockVerifier&) = delete;
  BlockVerifier& operator=(const BlockVerifier&) = delete;

  // Blocks until every block of `op` overlapping [offset, offset + bytes) is verified: OK if all
  // match, kDataLoss naming the first that does not. A range no block covers is kInternal.
  absl::Status WaitFor(size_t op, uint64_t offset, uint64_t bytes);

  uint64_t bytes_verified() const;

 private:
  enum class State : uint8_t { kPending, kGood, kBad };
  void Work();

  const std::vector<Block> blocks_;
  const std::string what_;
  mutable absl::Mutex mu_;
  std::vector<State> state_ ABSL_GUARDED_BY(mu_);
  std::vector<uint32_t> actual_ ABSL_GUARDED_BY(mu_);
  size_t next_ ABSL_GUARDED_BY(mu_) = 0;  // the next block a thread takes
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t bytes_verified_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::thread> threads_;
};

}  // namespace tessera

#endif  // TESSERA_AGENT_BLOCK_VERIFIER_H_
