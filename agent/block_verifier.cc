#include "agent/block_verifier.h"

#include <algorithm>
#include <system_error>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/crc32c.h"

namespace tessera {

BlockVerifier::BlockVerifier(std::vector<Block> blocks, int threads, std::string what)
    : blocks_(std::move(blocks)),
      what_(std::move(what)),
      state_(blocks_.size(), State::kPending),
      actual_(blocks_.size(), 0) {
  const size_t wanted = std::min<size_t>(std::max(threads, 1), std::max<size_t>(blocks_.size(), 1));
  for (size_t i = 0; i < wanted; ++i) {
    try {
      threads_.emplace_back(&BlockVerifier::Work, this);
    } catch (const std::system_error&) {
      break;  // fewer threads; WaitFor verifies on the caller's thread if there are none
    }
  }
}

BlockVerifier::~BlockVerifier() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (std::thread& t : threads_) t.join();
}

void BlockVerifier::Work() {
  for (;;) {
    size_t i;
    {
      absl::MutexLock lock(&mu_);
      if (stopping_ || next_ >= blocks_.size()) return;
      i = next_++;
    }
    const Block& b = blocks_[i];
    const uint32_t crc = Crc32c(b.data, b.bytes);
    absl::MutexLock lock(&mu_);
    actual_[i] = crc;
    state_[i] = crc == b.expected_crc32c ? State::kGood : State::kBad;
    bytes_verified_ += b.bytes;
  }
}

absl::Status BlockVerifier::WaitFor(size_t op, uint64_t offset, uint64_t bytes) {
  std::vector<size_t> wanted;
  uint64_t covered = 0;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    const Block& b = blocks_[i];
    if (b.op != op || b.offset + b.bytes <= offset || b.offset >= offset + bytes) continue;
    wanted.push_back(i);
    covered += std::min(b.offset + b.bytes, offset + bytes) - std::max(b.offset, offset);
  }
  if (covered != bytes) {
    return absl::InternalError(absl::StrCat(what_, ": bytes [", offset, ", +", bytes, ") of op ",
                                            op, " have no block checksum"));
  }
  if (threads_.empty()) {  // no thread to be had: verify here
    for (size_t i : wanted) {
      absl::MutexLock lock(&mu_);
      if (state_[i] != State::kPending) continue;
      const uint32_t crc = Crc32c(blocks_[i].data, blocks_[i].bytes);
      actual_[i] = crc;
      state_[i] = crc == blocks_[i].expected_crc32c ? State::kGood : State::kBad;
      bytes_verified_ += blocks_[i].bytes;
    }
  }
  absl::MutexLock lock(&mu_);
  for (size_t i : wanted) {
    mu_.Await(absl::Condition(
        +[](State* s) { return *s != State::kPending; }, &state_[i]));
    if (state_[i] == State::kBad) {
      const Block& b = blocks_[i];
      return absl::DataLossError(absl::StrCat(
          what_, ": bytes [", b.offset, ", +", b.bytes, ") of entry ", b.op, " have CRC32C 0x",
          absl::Hex(actual_[i]), ", not the 0x", absl::Hex(b.expected_crc32c),
          " recorded when they were snapshotted"));
    }
  }
  return absl::OkStatus();
}

uint64_t BlockVerifier::bytes_verified() const {
  absl::MutexLock lock(&mu_);
  return bytes_verified_;
}

}  // namespace tessera
