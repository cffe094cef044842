// The cipher pool on its own: every job queued runs, on the pool's threads, and a set of jobs
// reports the first record that failed whatever order they ended in.
#include "daemon/transfer/cipher_pool.h"

#include <atomic>
#include <cstdio>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

TEST(CipherPoolTest, EveryJobRunsOnThePoolsThreads) {
  std::set<std::thread::id> seen;
  absl::Mutex mu;
  CipherJobs jobs;
  {
    CipherPool pool(3);
    EXPECT_EQ(pool.threads(), 3);
    for (int i = 0; i < 500; ++i) {
      jobs.Add();
      pool.Run([&] {
        {
          absl::MutexLock lock(&mu);
          seen.insert(std::this_thread::get_id());
        }
        jobs.Done(true, 0, 0);
      });
    }
    uint64_t sequence = 0;
    size_t bytes = 0;
    EXPECT_TRUE(jobs.Wait(&sequence, &bytes));
  }
  EXPECT_EQ(seen.count(std::this_thread::get_id()), 0u);
  EXPECT_GE(seen.size(), 1u);
  EXPECT_LE(seen.size(), 3u);
  EXPECT_EQ(CipherPool(0).threads(), 1);
  EXPECT_EQ(CipherPool(1000).threads(), kMaxCipherThreads);
}

TEST(CipherPoolTest, JobsReportTheFirstRecordThatFailed) {
  const uint64_t seed = std::random_device{}();
  std::printf("seed=%llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  CipherPool pool(4);
  CipherJobs jobs;
  std::vector<uint64_t> failing;
  for (uint64_t sequence = 100; sequence < 300; ++sequence) {
    const bool ok = rng() % 7 != 0;
    if (!ok) failing.push_back(sequence);
    jobs.Add();
    pool.Run([&jobs, ok, sequence] { jobs.Done(ok, sequence, sequence * 10); });
  }
  ASSERT_FALSE(failing.empty());
  uint64_t sequence = 0;
  size_t bytes = 0;
  EXPECT_FALSE(jobs.Wait(&sequence, &bytes));
  EXPECT_EQ(sequence, failing.front());
  EXPECT_EQ(bytes, failing.front() * 10);
}

TEST(CipherPoolTest, BuffersAreReusedAtOneSize) {
  CipherPool pool(2);
  std::unique_ptr<uint8_t[]> a = pool.TakeBuffer(4096);
  uint8_t* const first = a.get();
  pool.GiveBuffer(std::move(a), 4096);
  std::unique_ptr<uint8_t[]> b = pool.TakeBuffer(4096);
  EXPECT_EQ(b.get(), first);
  pool.GiveBuffer(std::move(b), 4096);
  std::unique_ptr<uint8_t[]> c = pool.TakeBuffer(8192);  // another size: a new buffer
  EXPECT_NE(c.get(), nullptr);
  pool.GiveBuffer(std::move(c), 8192);
}

}  // namespace
}  // namespace tessera
