// The cipher pool on its own: every job queued runs, on the pool's threads, urgent ones first, and
// a set of jobs reports the first record that failed whatever order they ended in.
#include "daemon/transfer/cipher_pool.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
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

// A receiver's openings (urgent) run before the sealing queued ahead of them, in the order each
// kind was queued; the pool's threads run at the nice value asked.
TEST(CipherPoolTest, UrgentJobsRunFirstOnThreadsAtTheNiceValueAsked) {
  std::vector<int> order;
  std::vector<int> nice;
  absl::Mutex mu;
  absl::Notification blocked, release;
  {
    CipherPool pool(1, /*nice=*/7);
    pool.Run([&] {
      blocked.Notify();
      release.WaitForNotification();
    });
    blocked.WaitForNotification();  // the pool's one thread is busy: the rest queue up
    auto job = [&](int id) {
      return [&, id] {
        errno = 0;
        const int value = getpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)));
        absl::MutexLock lock(&mu);
        order.push_back(id);
        nice.push_back(errno == 0 ? value : -100);
      };
    };
    for (int i = 0; i < 3; ++i) pool.Run(job(i));
    pool.Run(job(10), /*urgent=*/true);
    pool.Run(job(3));
    pool.Run(job(11), /*urgent=*/true);
    release.Notify();
  }  // the destructor runs every job queued
  EXPECT_EQ(order, (std::vector<int>{10, 11, 0, 1, 2, 3}));
  errno = 0;
  const int base = getpriority(PRIO_PROCESS, 0);
  ASSERT_EQ(errno, 0);
  if (base <= 7) {  // (a process at a higher nice value may not lower its threads')
    EXPECT_EQ(nice, std::vector<int>(6, 7));
  }
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
