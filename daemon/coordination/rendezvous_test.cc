#include "daemon/coordination/rendezvous.h"

#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

rendezvous::JoinRequest Request(uint32_t index, uint32_t size, const std::string& payload,
                                const std::string& nonce, uint32_t wait_ms = 10000) {
  rendezvous::JoinRequest r;
  r.set_job_id("job");
  r.set_group("dp.0.1.2");
  r.set_index(index);
  r.set_size(size);
  r.set_payload(payload);
  r.set_nonce(nonce);
  r.set_wait_ms(wait_ms);
  return r;
}

std::string RandomPayload(std::mt19937_64& rng) {
  std::string s(1 + rng() % 300, '\0');
  for (char& c : s) c = static_cast<char>(rng());
  return s;
}

TEST(RendezvousTableTest, EveryMemberGetsEveryPayloadForManyRounds) {
  const uint64_t seed = std::random_device{}();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  RendezvousTable table;
  for (int round = 0; round < 20; ++round) {
    const uint32_t size = 1 + rng() % 6;
    std::vector<std::string> payloads;
    for (uint32_t i = 0; i < size; ++i) payloads.push_back(RandomPayload(rng));
    std::vector<absl::StatusOr<rendezvous::JoinResponse>> results(size);
    std::vector<std::thread> threads;
    for (uint32_t i = 0; i < size; ++i) {
      threads.emplace_back([&, i] {
        results[i] = table.Join(Request(i, size, payloads[i],
                                        "n" + std::to_string(round) + "-" + std::to_string(i)));
      });
    }
    for (auto& t : threads) t.join();
    for (uint32_t i = 0; i < size; ++i) {
      ASSERT_TRUE(results[i].ok()) << results[i].status();
      ASSERT_EQ(results[i]->payloads_size(), static_cast<int>(size));
      for (uint32_t j = 0; j < size; ++j) EXPECT_EQ(results[i]->payloads(j), payloads[j]);
    }
  }
  EXPECT_EQ(table.groups(), 1u);
}

TEST(RendezvousTableTest, ARetryWithTheSameNonceGetsTheCompletedRound) {
  RendezvousTable table;
  std::thread first([&] { ASSERT_TRUE(table.Join(Request(0, 2, "a", "x")).ok()); });
  auto second = table.Join(Request(1, 2, "b", "y"));
  first.join();
  ASSERT_TRUE(second.ok()) << second.status();
  // Index 0 lost its reply and asks again: same answer, no new round.
  auto retry = table.Join(Request(0, 2, "a", "x", 50));
  ASSERT_TRUE(retry.ok()) << retry.status();
  EXPECT_EQ(retry->payloads(0), "a");
  EXPECT_EQ(retry->payloads(1), "b");
  // A new nonce starts a new round, which waits for index 1 again.
  auto next = table.Join(Request(0, 2, "c", "z", 50));
  ASSERT_EQ(next.status().code(), absl::StatusCode::kDeadlineExceeded) << next.status();
  EXPECT_NE(next.status().message().find("still waiting for 1 of 2 (indices 1)"),
            std::string::npos) << next.status();
}

TEST(RendezvousTableTest, ATimedOutJoinStaysAndARestartedCallerReplacesIt) {
  RendezvousTable table;
  auto waited = table.Join(Request(0, 3, "stale", "old", 20));
  ASSERT_EQ(waited.status().code(), absl::StatusCode::kDeadlineExceeded);
  absl::StatusOr<rendezvous::JoinResponse> replaced, fresh, other;
  std::thread t1([&] { replaced = table.Join(Request(1, 3, "b-old", "b1")); });
  while (table.pending("job", "dp.0.1.2") < 2) {  // until index 1 waits in the round
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  std::thread t2([&] { fresh = table.Join(Request(1, 3, "b-new", "b2")); });
  t1.join();
  EXPECT_EQ(replaced.status().code(), absl::StatusCode::kAborted) << replaced.status();
  other = table.Join(Request(2, 3, "c", "c1"));
  t2.join();
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  ASSERT_TRUE(other.ok()) << other.status();
  // Index 0's timed-out join stayed in the round.
  EXPECT_EQ(fresh->payloads(0), "stale");
  EXPECT_EQ(fresh->payloads(1), "b-new");
  EXPECT_EQ(fresh->payloads(2), "c");
}

TEST(RendezvousTableTest, ValidationNamesTheField) {
  RendezvousTable table;
  struct Case {
    rendezvous::JoinRequest request;
    std::string expected;
  };
  std::vector<Case> cases;
  cases.push_back({Request(3, 3, "", "n"), "index 3 must be below the size 3"});
  cases.push_back({Request(0, 0, "", "n"), "size 0 must be 1..65536"});
  cases.push_back({Request(0, 1, "", ""), "nonce must be 1..64 bytes"});
  cases.push_back({Request(0, 1, std::string(70000, 'p'), "n"), "payload of 70000 bytes"});
  cases.push_back({Request(0, 1, "", "n", 0), "wait_ms 0 must be 1..60000"});
  auto bad_group = Request(0, 1, "", "n");
  bad_group.set_group("a/b");
  cases.push_back({bad_group, "may hold only"});
  auto bad_job = Request(0, 1, "", "n");
  bad_job.set_job_id("");
  cases.push_back({bad_job, "job"});
  for (const Case& c : cases) {
    auto r = table.Join(c.request);
    ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.expected;
    EXPECT_NE(r.status().message().find(c.expected), std::string::npos) << r.status();
  }
}

TEST(RendezvousRouterTest, StandaloneJoinsLocallyAndHostIndexIsStable) {
  RendezvousTable table;
  RendezvousRouter router(&table, {});
  auto r = router.Join(Request(0, 1, "solo", "n"));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->payloads(0), "solo");
  for (size_t live = 1; live < 10; ++live) {
    const size_t h = RendezvousRouter::HostIndex("job", "dp.0.1", live);
    EXPECT_LT(h, live);
    EXPECT_EQ(h, RendezvousRouter::HostIndex("job", "dp.0.1", live));
  }
}

}  // namespace
}  // namespace tessera
