// The copy engine on host memory. Runs anywhere: on a machine without a GPU both factories give
// the host engine; on a GPU machine Create() gives the CUDA engine, whose host-to-host path and
// ticket logic are then checked by the same tests. copy_engine_gpu_test.cc covers device memory.
#include "cuda/copy_engine.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iostream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "common/crc32c.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tessera::cuda {
namespace {

#define ASSERT_OK(expr)                    \
  do {                                     \
    const ::absl::Status status_ = (expr); \
    ASSERT_TRUE(status_.ok()) << status_;  \
  } while (0)
#define EXPECT_OK(expr)                    \
  do {                                     \
    const ::absl::Status status_ = (expr); \
    EXPECT_TRUE(status_.ok()) << status_;  \
  } while (0)

using ::testing::HasSubstr;
using ::testing::StartsWith;

uint64_t TestSeed() {
  const char* env = std::getenv("TESSERA_TEST_SEED");
  return env != nullptr ? std::strtoull(env, nullptr, 0) : 0x7e55e7a;
}

std::vector<unsigned char> RandomBytes(std::mt19937_64& rng, size_t bytes) {
  std::vector<unsigned char> out(bytes);
  size_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    const uint64_t word = rng();
    std::memcpy(&out[i], &word, 8);
  }
  for (; i < bytes; ++i) out[i] = static_cast<unsigned char>(rng());
  return out;
}

struct EngineFactory {
  std::string name;
  std::function<std::unique_ptr<CopyEngine>(const CopyEngineOptions&)> make;
};

std::ostream& operator<<(std::ostream& os, const EngineFactory& factory) {
  return os << factory.name;
}

// Random sources, and destinations laid out at odd offsets in one buffer (a stand-in for a slot).
class Snapshot {
 public:
  Snapshot(std::mt19937_64& rng, const std::vector<size_t>& sizes) {
    size_t offset = 1;
    for (size_t bytes : sizes) {
      sources_.push_back(RandomBytes(rng, bytes));
      offsets_.push_back(offset);
      offset += bytes + 3;
    }
    // Random, not zero, so that a byte left unwritten is seen.
    slot_ = RandomBytes(rng, offset);
  }

  std::vector<CopyOp> Ops() {
    std::vector<CopyOp> ops;
    for (size_t i = 0; i < sources_.size(); ++i) {
      ops.push_back({slot_.data() + offsets_[i], sources_[i].data(), sources_[i].size()});
    }
    return ops;
  }

  // Index of the first source whose copy in the slot differs, or -1.
  int FirstMismatch() const {
    for (size_t i = 0; i < sources_.size(); ++i) {
      if (std::memcmp(slot_.data() + offsets_[i], sources_[i].data(), sources_[i].size()) != 0) {
        return static_cast<int>(i);
      }
    }
    return -1;
  }

  uint64_t total_bytes() const {
    uint64_t total = 0;
    for (const auto& source : sources_) total += source.size();
    return total;
  }

  // The CRC32C of source i, and of its copy in the slot.
  uint32_t SourceCrc(size_t i) const { return Crc32c(sources_[i].data(), sources_[i].size()); }
  uint32_t CopyCrc(size_t i) const {
    return Crc32c(slot_.data() + offsets_[i], sources_[i].size());
  }
  unsigned char* copy(size_t i) { return slot_.data() + offsets_[i]; }
  size_t size() const { return sources_.size(); }

  const std::vector<unsigned char>& slot() const { return slot_; }
  std::vector<unsigned char>& source(size_t i) { return sources_[i]; }

 private:
  std::vector<std::vector<unsigned char>> sources_;
  std::vector<size_t> offsets_;
  std::vector<unsigned char> slot_;
};

class CopyEngineTest : public ::testing::TestWithParam<EngineFactory> {
 protected:
  void SetUp() override {
    seed_ = TestSeed();
    std::cout << "seed " << seed_ << " (set TESSERA_TEST_SEED to repeat)\n";
    RecordProperty("seed", std::to_string(seed_));
    rng_.seed(seed_);
    engine_ = Make(CopyEngineOptions());
  }

  std::unique_ptr<CopyEngine> Make(const CopyEngineOptions& options) {
    return GetParam().make(options);
  }

  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
  std::unique_ptr<CopyEngine> engine_;
};

const std::vector<size_t> kOddSizes = {0, 1, 3, 4095, 4097, (1 << 20) + 1, (9 << 20) + 7};

TEST_P(CopyEngineTest, IssueCopiesIsBitExact) {
  Snapshot snapshot(rng_, kOddSizes);
  absl::StatusOr<uint64_t> ticket = engine_->MarkSnapshotPoint(nullptr);
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  ASSERT_OK(engine_->IssueCopies(*ticket, snapshot.Ops()));
  ASSERT_OK(engine_->WaitCopies(*ticket));
  EXPECT_EQ(snapshot.FirstMismatch(), -1);
  EXPECT_EQ(engine_->stats().bytes_host_to_host, snapshot.total_bytes());
  EXPECT_EQ(engine_->stats().bytes_device_to_host, 0u);
}

TEST_P(CopyEngineTest, CopiesSplitAcrossThreadsAreBitExact) {
  CopyEngineOptions options;
  options.host_copy_threads = 3;
  options.host_parallel_min_bytes = 1;  // every call splits, across op boundaries too
  std::unique_ptr<CopyEngine> engine = Make(options);
  Snapshot snapshot(rng_, {5, (3 << 20) + 1, 12289, 1, (1 << 20) - 1});
  absl::StatusOr<uint64_t> ticket = engine->MarkSnapshotPoint(nullptr);
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  ASSERT_OK(engine->IssueCopies(*ticket, snapshot.Ops()));
  ASSERT_OK(engine->WaitCopies(*ticket));
  EXPECT_EQ(snapshot.FirstMismatch(), -1);

  Snapshot restored(rng_, {(2 << 20) + 9, 7});
  ASSERT_OK(engine->CopySync(restored.Ops()));
  EXPECT_EQ(restored.FirstMismatch(), -1);
}

TEST_P(CopyEngineTest, TicketsIncrease) {
  uint64_t previous = 0;
  for (int i = 0; i < 5; ++i) {
    absl::StatusOr<uint64_t> ticket = engine_->MarkSnapshotPoint(nullptr);
    ASSERT_TRUE(ticket.ok()) << ticket.status();
    EXPECT_GT(*ticket, previous);
    previous = *ticket;
    ASSERT_OK(engine_->IssueCopies(*ticket, {}));
  }
  EXPECT_EQ(engine_->stats().tickets, 5u);
}

TEST_P(CopyEngineTest, FenceWaitsForCopiesIssuedLater) {
  Snapshot snapshot(rng_, {(32 << 20) + 5, 17});
  absl::StatusOr<uint64_t> ticket = engine_->MarkSnapshotPoint(nullptr);
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  absl::Status issued;
  std::thread agent([&] {
    absl::SleepFor(absl::Milliseconds(50));
    issued = engine_->IssueCopies(*ticket, snapshot.Ops());
  });
  const absl::Time start = absl::Now();
  const absl::Status fence = engine_->Fence(nullptr);
  const absl::Duration fenced = absl::Now() - start;
  // Host copies are done before IssueCopies returns, so after Fence the slot holds the copy and
  // the sources may change.
  const int mismatch = snapshot.FirstMismatch();
  std::memset(snapshot.source(0).data(), 0x5a, 4096);
  agent.join();
  ASSERT_TRUE(fence.ok()) << fence;
  EXPECT_EQ(mismatch, -1);
  ASSERT_TRUE(issued.ok()) << issued;
  EXPECT_GE(fenced, absl::Milliseconds(40));
  const CopyEngineStats stats = engine_->stats();
  EXPECT_EQ(stats.fences, 1u);
  EXPECT_EQ(stats.fence_cpu_waits, 1u);
  EXPECT_GE(stats.fence_cpu_wait_ns, 40'000'000u);
  EXPECT_EQ(stats.tickets_abandoned, 0u);
}

TEST_P(CopyEngineTest, FenceWithNothingOutstandingDoesNotWait) {
  ASSERT_OK(engine_->Fence(nullptr));
  absl::StatusOr<uint64_t> ticket = engine_->MarkSnapshotPoint(nullptr);
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  Snapshot snapshot(rng_, {4096});
  ASSERT_OK(engine_->IssueCopies(*ticket, snapshot.Ops()));
  ASSERT_OK(engine_->Fence(nullptr));
  EXPECT_EQ(snapshot.FirstMismatch(), -1);
  EXPECT_EQ(engine_->stats().fences, 2u);
  EXPECT_EQ(engine_->stats().fence_cpu_waits, 0u);
}

TEST_P(CopyEngineTest, FenceAbandonsATicketNeverIssued) {
  CopyEngineOptions options;
  options.fence_issue_timeout_ms = 50;
  std::unique_ptr<CopyEngine> engine = Make(options);
  Snapshot snapshot(rng_, {4096, 3});
  const std::vector<unsigned char> slot_before = snapshot.slot();
  absl::StatusOr<uint64_t> ticket = engine->MarkSnapshotPoint(nullptr);
  ASSERT_TRUE(ticket.ok()) << ticket.status();

  const absl::Time start = absl::Now();
  ASSERT_OK(engine->Fence(nullptr));
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(45));
  EXPECT_EQ(engine->stats().tickets_abandoned, 1u);

  const absl::Status late = engine->IssueCopies(*ticket, snapshot.Ops());
  EXPECT_EQ(late.code(), absl::StatusCode::kAborted) << late;
  EXPECT_EQ(snapshot.slot(), slot_before) << "an abandoned ticket copied";
  EXPECT_EQ(engine->WaitCopies(*ticket).code(), absl::StatusCode::kAborted);

  absl::StatusOr<uint64_t> next = engine->MarkSnapshotPoint(nullptr);
  ASSERT_TRUE(next.ok()) << next.status();
  ASSERT_OK(engine->IssueCopies(*next, snapshot.Ops()));
  ASSERT_OK(engine->WaitCopies(*next));
  EXPECT_EQ(snapshot.FirstMismatch(), -1);
}

TEST_P(CopyEngineTest, TicketsAreIssuedOnceInOrder) {
  absl::StatusOr<uint64_t> first = engine_->MarkSnapshotPoint(nullptr);
  absl::StatusOr<uint64_t> second = engine_->MarkSnapshotPoint(nullptr);
  ASSERT_TRUE(first.ok() && second.ok());

  absl::Status status = engine_->IssueCopies(*second, {});
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("order"));
  EXPECT_OK(engine_->IssueCopies(*first, {}));
  status = engine_->IssueCopies(*first, {});
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
  EXPECT_OK(engine_->IssueCopies(*second, {}));
  EXPECT_EQ(engine_->IssueCopies(*second + 1, {}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->IssueCopies(0, {}).code(), absl::StatusCode::kInvalidArgument);
}

TEST_P(CopyEngineTest, WaitCopiesNeedsAnIssuedTicket) {
  EXPECT_EQ(engine_->WaitCopies(0).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->WaitCopies(1).code(), absl::StatusCode::kInvalidArgument);
  absl::StatusOr<uint64_t> ticket = engine_->MarkSnapshotPoint(nullptr);
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  EXPECT_EQ(engine_->WaitCopies(*ticket).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_OK(engine_->IssueCopies(*ticket, {}));
  EXPECT_OK(engine_->WaitCopies(*ticket));
  EXPECT_OK(engine_->WaitCopies(*ticket));
}

TEST_P(CopyEngineTest, NullPointersAreInvalidArgumentAndCopyNothing) {
  Snapshot snapshot(rng_, {4096, 64});
  const std::vector<unsigned char> slot_before = snapshot.slot();
  std::vector<CopyOp> ops = snapshot.Ops();
  ops.push_back({nullptr, nullptr, 0});  // empty: fine
  for (CopyOp bad : {CopyOp{nullptr, ops[0].src, 16}, CopyOp{ops[0].dst, nullptr, 16}}) {
    std::vector<CopyOp> with_bad = ops;
    with_bad.push_back(bad);
    absl::StatusOr<uint64_t> ticket = engine_->MarkSnapshotPoint(nullptr);
    ASSERT_TRUE(ticket.ok()) << ticket.status();
    const absl::Status status = engine_->IssueCopies(*ticket, with_bad);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_THAT(std::string(status.message()), HasSubstr("copy op 3"));
    EXPECT_EQ(snapshot.slot(), slot_before);
    EXPECT_EQ(engine_->WaitCopies(*ticket), status);
    EXPECT_EQ(engine_->CopySync(with_bad).code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(snapshot.slot(), slot_before);
  }
  // The failed tickets were consumed: Fence has nothing to wait for.
  ASSERT_OK(engine_->Fence(nullptr));
  EXPECT_EQ(engine_->stats().fence_cpu_waits, 0u);

  absl::StatusOr<uint64_t> ticket = engine_->MarkSnapshotPoint(nullptr);
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  ASSERT_OK(engine_->IssueCopies(*ticket, ops));
  ASSERT_OK(engine_->WaitCopies(*ticket));
  EXPECT_EQ(snapshot.FirstMismatch(), -1);
}

TEST_P(CopyEngineTest, CopySyncIsBitExact) {
  Snapshot restored(rng_, kOddSizes);
  ASSERT_OK(engine_->CopySync(restored.Ops()));
  EXPECT_EQ(restored.FirstMismatch(), -1);
  EXPECT_EQ(engine_->stats().bytes_copied_sync, restored.total_bytes());
  EXPECT_OK(engine_->CopySync({}));
}

TEST_P(CopyEngineTest, RegisterAndLocateHostMemory) {
  std::vector<unsigned char> memory(1 << 16);
  EXPECT_EQ(engine_->RegisterHost(nullptr, 4096).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->RegisterHost(memory.data(), 0).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_OK(engine_->RegisterHost(memory.data(), memory.size()));
  absl::StatusOr<MemoryKind> kind = engine_->Locate(memory.data() + 100);
  ASSERT_TRUE(kind.ok()) << kind.status();
  EXPECT_EQ(*kind, MemoryKind::kHost);
  EXPECT_OK(engine_->UnregisterHost(memory.data()));
  EXPECT_EQ(engine_->UnregisterHost(nullptr).code(), absl::StatusCode::kInvalidArgument);

  int on_stack = 0;
  kind = engine_->Locate(&on_stack);
  ASSERT_TRUE(kind.ok()) << kind.status();
  EXPECT_EQ(*kind, MemoryKind::kHost);
  EXPECT_EQ(engine_->Locate(nullptr).status().code(), absl::StatusCode::kInvalidArgument);
}

// The snapshot loop as the agent runs it: the trainer thread marks and fences, an agent thread
// issues and waits, alternating between two slots, while the trainer changes the state between
// steps.
TEST_P(CopyEngineTest, SnapshotLoopAcrossTwoThreads) {
  constexpr int kSteps = 40;
  std::vector<std::vector<unsigned char>> state;
  for (size_t bytes : {size_t{(1 << 20) + 3}, size_t{777}, size_t{65536}}) {
    state.push_back(RandomBytes(rng_, bytes));
  }
  std::vector<std::vector<std::vector<unsigned char>>> slots(2);
  for (auto& slot : slots) {
    for (const auto& tensor : state) slot.emplace_back(tensor.size());
  }
  std::vector<std::vector<std::vector<unsigned char>>> expected(kSteps);

  std::vector<uint64_t> tickets(kSteps);
  std::vector<absl::Notification> marked(kSteps);
  std::vector<std::string> failures;
  std::thread agent([&] {
    for (int step = 0; step < kSteps; ++step) {
      marked[step].WaitForNotification();
      auto& slot = slots[step % 2];
      std::vector<CopyOp> ops;
      for (size_t i = 0; i < state.size(); ++i) {
        ops.push_back({slot[i].data(), state[i].data(), state[i].size()});
      }
      absl::Status status = engine_->IssueCopies(tickets[step], ops);
      if (status.ok()) status = engine_->WaitCopies(tickets[step]);
      if (!status.ok()) failures.push_back(status.ToString());
      if (slot != expected[step]) failures.push_back("step " + std::to_string(step) + " differs");
    }
  });
  for (int step = 0; step < kSteps; ++step) {
    for (auto& tensor : state) tensor[rng_() % tensor.size()] ^= 0xff;  // the optimizer step
    expected[step] = state;
    absl::StatusOr<uint64_t> ticket = engine_->MarkSnapshotPoint(nullptr);
    EXPECT_TRUE(ticket.ok()) << ticket.status();
    tickets[step] = ticket.value_or(0);
    marked[step].Notify();
    const absl::Status fence = engine_->Fence(nullptr);
    EXPECT_TRUE(fence.ok()) << fence;
  }
  agent.join();
  EXPECT_THAT(failures, ::testing::IsEmpty());
  EXPECT_EQ(engine_->stats().tickets, static_cast<uint64_t>(kSteps));
  EXPECT_EQ(engine_->stats().fences, static_cast<uint64_t>(kSteps));
  EXPECT_EQ(engine_->stats().tickets_abandoned, 0u);
}

// `blocks` are the CRC32C of each `block_bytes` of [data, data + bytes), the last one shorter.
void ExpectBlocks(const unsigned char* data, size_t bytes, size_t block_bytes,
                  const std::vector<uint32_t>& blocks) {
  ASSERT_EQ(blocks.size(), (bytes + block_bytes - 1) / block_bytes);
  for (size_t b = 0; b < blocks.size(); ++b) {
    EXPECT_EQ(blocks[b],
              Crc32c(data + b * block_bytes, std::min(block_bytes, bytes - b * block_bytes)))
        << "block " << b;
  }
}

// The checksums come from the destinations as the copies left them, on one thread and split
// across threads (shares crossing op boundaries), and a byte changed afterwards no longer matches.
TEST_P(CopyEngineTest, ChecksummedCopiesGiveEachDestinationsCrc) {
  for (int threads : {1, 3}) {
    SCOPED_TRACE("host_copy_threads=" + std::to_string(threads));
    CopyEngineOptions options;
    options.host_copy_threads = threads;
    options.host_parallel_min_bytes = 1;
    options.checksum_block_bytes = 300000;  // blocks cut across the threads' shares
    std::unique_ptr<CopyEngine> engine = Make(options);
    Snapshot snapshot(rng_, {0, 1, 3, 4095, (1 << 20) + 1, 262145, (3 << 20) + 7, 5});
    absl::StatusOr<uint64_t> ticket = engine->MarkSnapshotPoint(nullptr);
    ASSERT_TRUE(ticket.ok()) << ticket.status();
    ASSERT_OK(engine->IssueChecksummedCopies(*ticket, snapshot.Ops()));
    absl::StatusOr<std::vector<OpChecksum>> crcs = engine->WaitChecksums(*ticket);
    ASSERT_TRUE(crcs.ok()) << crcs.status();
    EXPECT_EQ(snapshot.FirstMismatch(), -1);
    ASSERT_EQ(crcs->size(), snapshot.size());
    for (size_t i = 0; i < snapshot.size(); ++i) {
      EXPECT_EQ((*crcs)[i].crc, snapshot.SourceCrc(i)) << "op " << i;
      EXPECT_EQ((*crcs)[i].crc, snapshot.CopyCrc(i)) << "op " << i;
      ExpectBlocks(snapshot.copy(i), snapshot.Ops()[i].bytes, options.checksum_block_bytes,
                   (*crcs)[i].blocks);
    }
    EXPECT_EQ(engine->stats().bytes_checksummed, snapshot.total_bytes());
    // Changed after it was checksummed: the destination no longer matches its checksum.
    const size_t victim = 4;
    const size_t at = rng_() % (snapshot.Ops()[victim].bytes);
    snapshot.copy(victim)[at] ^= 0x01;
    EXPECT_NE(snapshot.CopyCrc(victim), (*crcs)[victim].crc) << "byte " << at;

    // Taken once; a ticket issued without checksums has none.
    EXPECT_EQ(engine->WaitChecksums(*ticket).status().code(),
              absl::StatusCode::kFailedPrecondition);
    absl::StatusOr<uint64_t> plain = engine->MarkSnapshotPoint(nullptr);
    ASSERT_TRUE(plain.ok()) << plain.status();
    ASSERT_OK(engine->IssueCopies(*plain, snapshot.Ops()));
    const absl::Status none = engine->WaitChecksums(*plain).status();
    EXPECT_EQ(none.code(), absl::StatusCode::kFailedPrecondition) << none;
    EXPECT_THAT(std::string(none.message()), HasSubstr("IssueChecksummedCopies"));
  }
}

// A check that fails stops the copy there: what it passed is copied, nothing after it.
TEST_P(CopyEngineTest, CopySyncCheckedCopiesOnlyWhatItsCheckPassed) {
  Snapshot restored(rng_, {4097, 3, (1 << 20) + 5, 11});
  std::vector<size_t> checked;
  const absl::Status status = engine_->CopySyncChecked(
      restored.Ops(), [&](size_t op, uint64_t offset, uint64_t bytes) -> absl::Status {
        checked.push_back(op);
        EXPECT_EQ(offset, 0u);
        EXPECT_EQ(bytes, restored.Ops()[op].bytes);
        if (op == 2) return absl::DataLossError("block 0 of op 2 does not match");
        return absl::OkStatus();
      });
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss) << status;
  EXPECT_THAT(checked, ::testing::ElementsAre(0, 1, 2));
  EXPECT_EQ(std::memcmp(restored.copy(0), restored.source(0).data(), 4097), 0);
  EXPECT_EQ(std::memcmp(restored.copy(1), restored.source(1).data(), 3), 0);
  EXPECT_NE(std::memcmp(restored.copy(2), restored.source(2).data(), (1 << 20) + 5), 0);
  EXPECT_NE(std::memcmp(restored.copy(3), restored.source(3).data(), 11), 0);
  // Every check passing: bit-exact.
  ASSERT_OK(engine_->CopySyncChecked(restored.Ops(),
                                     [](size_t, uint64_t, uint64_t) { return absl::OkStatus(); }));
  EXPECT_EQ(restored.FirstMismatch(), -1);
}

// Each block's CRC32C, in blocks of `block` bytes.
std::vector<uint32_t> BlockCrcs(const std::vector<uint8_t>& bytes, size_t block) {
  std::vector<uint32_t> crcs;
  for (size_t at = 0; at < bytes.size(); at += block) {
    crcs.push_back(Crc32c(bytes.data() + at, std::min(block, bytes.size() - at)));
  }
  return crcs;
}

// Host memory is verified before it is copied: the ops before a bad block are copied, the op
// holding it is not, and the error names the op, the bytes and both CRC32Cs.
TEST_P(CopyEngineTest, CopySyncVerifiedCopiesNothingPastABadBlock) {
  const size_t block = 4096;
  Snapshot restored(rng_, {4097, 3, 3 * 4096 + 5, 11});
  std::vector<std::vector<uint32_t>> expected;
  for (size_t i = 0; i < 4; ++i) expected.push_back(BlockCrcs(restored.source(i), block));
  expected[1].clear();  // not verified: `before` sees it
  std::vector<size_t> before_ops;
  auto before = [&](size_t op, uint64_t, uint64_t) {
    before_ops.push_back(op);
    return absl::OkStatus();
  };
  const uint32_t sealed = expected[2][2];
  expected[2][2] ^= 1u << (rng_() % 32);  // block 2 of op 2 no longer matches its bytes
  const absl::Status status = engine_->CopySyncVerified(restored.Ops(), before, expected, block);
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss) << status;
  EXPECT_THAT(std::string(status.message()),
              ::testing::HasSubstr(absl::StrCat("bytes [8192, +4096) of copy op 2 have CRC32C 0x",
                                                absl::Hex(sealed))));
  EXPECT_THAT(before_ops, ::testing::ElementsAre(1));
  EXPECT_EQ(std::memcmp(restored.copy(0), restored.source(0).data(), 4097), 0);
  EXPECT_EQ(std::memcmp(restored.copy(1), restored.source(1).data(), 3), 0);
  EXPECT_NE(std::memcmp(restored.copy(2), restored.source(2).data(), 3 * 4096 + 5), 0);
  EXPECT_NE(std::memcmp(restored.copy(3), restored.source(3).data(), 11), 0);
  // Matching: bit-exact.
  expected[2][2] = sealed;
  ASSERT_OK(engine_->CopySyncVerified(restored.Ops(), before, expected, block));
  EXPECT_EQ(restored.FirstMismatch(), -1);
  // Lists that do not fit the ops are refused, naming what would fit.
  expected[3].push_back(0);
  const absl::Status refused = engine_->CopySyncVerified(restored.Ops(), before, expected, block);
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument) << refused;
  EXPECT_THAT(std::string(refused.message()), ::testing::HasSubstr("blocks of 4096 bytes make 1"));
  expected.pop_back();
  EXPECT_EQ(engine_->CopySyncVerified(restored.Ops(), before, expected, block).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_P(CopyEngineTest, AFailedChecksummedIssueReportsItsErrorToWaitChecksums) {
  absl::StatusOr<uint64_t> ticket = engine_->MarkSnapshotPoint(nullptr);
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  unsigned char byte = 7;
  const absl::Status issued = engine_->IssueChecksummedCopies(*ticket, {{nullptr, &byte, 1}});
  EXPECT_EQ(issued.code(), absl::StatusCode::kInvalidArgument) << issued;
  EXPECT_EQ(engine_->WaitChecksums(*ticket).status(), issued);
}

INSTANTIATE_TEST_SUITE_P(Engines, CopyEngineTest,
                         ::testing::Values(EngineFactory{"HostOnly",
                                                         [](const CopyEngineOptions& options) {
                                                           return CopyEngine::CreateHostOnly(
                                                               options);
                                                         }},
                                           EngineFactory{"Create",
                                                         [](const CopyEngineOptions& options) {
                                                           return CopyEngine::Create(-1, options);
                                                         }}),
                         [](const ::testing::TestParamInfo<EngineFactory>& info) {
                           return info.param.name;
                         });

TEST(CopyEngineCreateTest, HostOnlyEngineSaysSo) {
  std::unique_ptr<CopyEngine> engine = CopyEngine::CreateHostOnly();
  EXPECT_FALSE(engine->has_gpu());
  EXPECT_EQ(engine->Describe(), "host (GPU path not requested)");
}

TEST(CopyEngineCreateTest, FallsBackToTheHostEngineWithoutAGpu) {
  std::unique_ptr<CopyEngine> engine = CopyEngine::Create();
  if (engine->has_gpu()) GTEST_SKIP() << "a CUDA device is present: " << engine->Describe();
  EXPECT_THAT(engine->Describe(), StartsWith("host (no CUDA device: cudaError"));
  // A second fallback works the same (and logs at debug only).
  EXPECT_FALSE(CopyEngine::Create(0)->has_gpu());
}

TEST(CopyEngineCreateTest, AMissingDeviceFallsBackToTheHostEngine) {
  std::unique_ptr<CopyEngine> engine = CopyEngine::Create(1 << 20);
  EXPECT_FALSE(engine->has_gpu());
  EXPECT_THAT(engine->Describe(), StartsWith("host ("));
}

TEST(CudaStatusTest, NamesTheCallAndTheError) {
  EXPECT_TRUE(CudaStatus(cudaSuccess, "cudaMemcpyAsync").ok());
  const absl::Status invalid =
      CudaStatus(cudaErrorInvalidValue, "cudaMemcpyAsync(D2H, 1048576 bytes)");
  EXPECT_EQ(invalid.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(invalid.message()),
              StartsWith("cudaMemcpyAsync(D2H, 1048576 bytes): cudaErrorInvalidValue"));
  EXPECT_EQ(CudaStatus(cudaErrorMemoryAllocation, "cudaMalloc").code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(CudaStatus(cudaErrorNoDevice, "cudaGetDeviceCount").code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(CudaStatus(cudaErrorHostMemoryAlreadyRegistered, "cudaHostRegister").code(),
            absl::StatusCode::kAlreadyExists);
  const absl::Status unknown = CudaStatus(cudaErrorUnknown, "cudaLaunchKernel");
  EXPECT_EQ(unknown.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(std::string(unknown.message()), StartsWith("cudaLaunchKernel: cudaErrorUnknown"));
}

}  // namespace
}  // namespace tessera::cuda
