// The admin service with real processes on loopback: a cluster of tesserads with a cluster
// token, trainers that snapshot a job, then every admin call through the agent socket of one
// daemon (which asks the others over TCP) and over TCP with and without the token. Drills damage
// real memory (a fragment, a slot), make a daemon lose its memory, and rebuild.
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "proto/admin.grpc.pb.h"
#include "tests/harness.h"
#include "tests/metrics_page.h"

namespace tessera::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

constexpr char kToken[] = "admin-test-token-0123456789";

std::unique_ptr<admin::Admin::Stub> Connect(const std::string& target) {
  return admin::Admin::NewStub(grpc::CreateChannel(target, grpc::InsecureChannelCredentials()));
}

// Calls `method` with a deadline and, when given, the token.
template <typename Request, typename Response, typename Method>
grpc::Status Call(admin::Admin::Stub* stub, Method method, const Request& request,
                  Response* response, const std::string& token = "") {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + seconds(60));
  if (!token.empty()) context.AddMetadata("x-tessera-token", token);
  return (stub->*method)(&context, request, response);
}

const admin::JobStatus* FindJob(const admin::GetStatusResponse& status, const std::string& job) {
  for (const auto& j : status.jobs()) {
    if (j.job_id() == job) return &j;
  }
  return nullptr;
}

// Metric samples by "name{labels}" from a /metrics page.
std::map<std::string, double> Scrape(int port) {
  absl::StatusOr<std::map<std::string, double>> samples = ScrapeMetrics(port);
  EXPECT_TRUE(samples.ok()) << samples.status();
  return samples.ok() ? *samples : std::map<std::string, double>();
}

class AdminTest : public ::testing::Test {
 protected:
  static constexpr int kNodes = 4;
  static constexpr uint32_t kWorld = 4;

  void SetUp() override {
    seed_ = TestSeed();
    for (int i = 0; i < kNodes; ++i) addresses_.push_back(absl::StrCat("127.0.0.1:", FreePort()));
    metrics_port_ = FreePort();
    for (int i = 0; i < kNodes; ++i) {
      std::vector<std::string> flags = {
          "--set", "peer.listen_address=" + addresses_[i],
          "--set", "cluster.members=" + absl::StrJoin(addresses_, ","),
          "--set", "cluster.token=" + std::string(kToken),
          "--set", "ec.k=2",
          "--set", "ec.m=1",
          "--set", "liveness.heartbeat_ms=100",
          "--set", "liveness.timeout_ms=1000"};
      if (i == 0) {
        flags.insert(flags.end(),
                     {"--set", absl::StrCat("metrics.listen_address=127.0.0.1:", metrics_port_)});
      }
      daemons_.push_back(std::make_unique<DaemonProcess>(root_.path(), absl::StrCat("n", i),
                                                         uint64_t{512} << 20, flags));
      std::string error;
      ASSERT_TRUE(daemons_.back()->Start(&error)) << error;
    }
    std::this_thread::sleep_for(milliseconds(600));  // every daemon hears every other
    local_ = Connect("unix:" + daemons_[0]->socket_path());
  }

  // Trains `job` for `steps` steps, rank r on daemon r, and waits until daemon 0 reports every
  // rank of the newest sealed step protected (its status says PROTECTED at that step).
  int64_t TrainAndProtect(const std::string& job, int steps) {
    int64_t last_sealed = -1;
    for (uint32_t r = 0; r < kWorld; ++r) {
      auto trainer = Process::Start(
          {BinaryPath("tests/trainer"), "--socket=" + daemons_[r]->socket_path(), "--job=" + job,
           absl::StrCat("--seed=", seed_ + r), absl::StrCat("--rank=", r),
           absl::StrCat("--world=", kWorld), "--tensors=5", "--min-bytes=1000",
           "--max-bytes=300000", "--total-bytes=1000000", absl::StrCat("--steps=", steps),
           "--step-sleep-ms=50"});
      trainer_pids_.push_back(trainer->pid());
      trainers_.push_back(std::move(trainer));
    }
    for (auto& t : trainers_) {
      EXPECT_EQ(t->Wait(seconds(120)), 0) << absl::StrJoin(t->lines(), "\n");
      const int64_t sealed = LastEvent(t->lines(), "sealed");
      last_sealed = last_sealed < 0 ? sealed : std::min(last_sealed, sealed);
    }
    for (int i = 0; i < 300; ++i) {
      admin::GetStatusResponse status;
      EXPECT_TRUE(
          Call(local_.get(), &admin::Admin::Stub::GetStatus, admin::GetStatusRequest(), &status)
              .ok());
      const admin::JobStatus* j = FindJob(status, job);
      if (j != nullptr && j->committed_step() >= last_sealed && j->health() == admin::PROTECTED) {
        return j->committed_step();
      }
      std::this_thread::sleep_for(milliseconds(100));
    }
    ADD_FAILURE() << "job " << job << " was not protected at step " << last_sealed;
    return -1;
  }

  uint64_t seed_ = 0;
  TempRoot root_;
  std::vector<std::string> addresses_;
  int metrics_port_ = 0;
  std::vector<std::unique_ptr<DaemonProcess>> daemons_;
  std::vector<std::unique_ptr<Process>> trainers_;
  std::vector<pid_t> trainer_pids_;
  std::unique_ptr<admin::Admin::Stub> local_;
};

TEST_F(AdminTest, StatusVersionsTrainersAndMetricsDescribeTheCluster) {
  const std::string job = "admin-status";
  const int64_t committed = TrainAndProtect(job, 6);
  ASSERT_GE(committed, 0);

  admin::GetStatusResponse status;
  ASSERT_TRUE(
      Call(local_.get(), &admin::Admin::Stub::GetStatus, admin::GetStatusRequest(), &status).ok());
  EXPECT_EQ(status.self().node_id(), "n0");
  EXPECT_EQ(status.self().ec_k(), 2u);
  EXPECT_GT(status.self().memory().slot_bytes(), 0u);
  EXPECT_GT(status.self().memory().fragment_bytes(), 0u);
  EXPECT_EQ(status.self().metrics_address(), absl::StrCat("127.0.0.1:", metrics_port_));
  ASSERT_EQ(status.members_size(), kNodes) << status.DebugString();
  EXPECT_EQ(status.members(0).state(), admin::MemberStatus::SELF);
  std::set<std::string> seen;
  for (const auto& m : status.members()) {
    seen.insert(m.node_id());
    EXPECT_TRUE(m.state() == admin::MemberStatus::SELF || m.state() == admin::MemberStatus::ALIVE)
        << m.DebugString();
    EXPECT_EQ(m.info().node_id(), m.node_id()) << m.DebugString();  // every member answered
    EXPECT_GT(m.info().incarnation(), 0u);
    EXPECT_GT(m.info().pid(), 0);
    EXPECT_GT(m.info().memory().capacity_bytes(), 0u);
  }
  EXPECT_EQ(seen, (std::set<std::string>{"n0", "n1", "n2", "n3"}));
  EXPECT_EQ(status.errors_size(), 0) << status.DebugString();
  const admin::JobStatus* j = FindJob(status, job);
  ASSERT_NE(j, nullptr);
  EXPECT_EQ(j->health(), admin::PROTECTED) << j->reason();
  EXPECT_EQ(j->world_size(), kWorld);
  EXPECT_EQ(j->ec_k(), 2u);
  EXPECT_EQ(j->ec_m(), 1u);
  EXPECT_GE(j->newest_step(), j->committed_step());
  EXPECT_EQ(j->nodes_size(), kNodes);

  admin::ListJobsResponse jobs;
  ASSERT_TRUE(
      Call(local_.get(), &admin::Admin::Stub::ListJobs, admin::ListJobsRequest(), &jobs).ok());
  ASSERT_EQ(jobs.jobs_size(), 1);
  EXPECT_EQ(jobs.jobs(0).job_id(), job);

  admin::ListVersionsRequest versions_request;
  versions_request.set_job_id(job);
  admin::ListVersionsResponse versions, again;
  ASSERT_TRUE(
      Call(local_.get(), &admin::Admin::Stub::ListVersions, versions_request, &versions).ok());
  ASSERT_TRUE(Call(local_.get(), &admin::Admin::Stub::ListVersions, versions_request, &again).ok());
  EXPECT_EQ(versions.SerializeAsString(), again.SerializeAsString());  // nothing changes
  ASSERT_GE(versions.steps_size(), 1);
  bool found_committed = false;
  for (const auto& step : versions.steps()) {
    if (!step.committed()) continue;
    found_committed = true;
    EXPECT_EQ(step.step(), j->committed_step());
    EXPECT_TRUE(step.restorable());
    ASSERT_EQ(step.ranks_size(), static_cast<int>(kWorld));
    for (const auto& r : step.ranks()) {
      EXPECT_EQ(r.fragment_indexes_size(), 3) << r.DebugString();
      EXPECT_EQ(r.shard_nodes_size(), 1);
      EXPECT_EQ(r.shard_nodes(0), absl::StrCat("n", r.rank()));
      for (const auto& node : r.fragment_nodes()) EXPECT_NE(node, r.shard_nodes(0));
    }
  }
  EXPECT_TRUE(found_committed) << versions.DebugString();

  // Every rank's trainer, with the pid the agent socket saw, on the node it ran on.
  admin::ListTrainersResponse trainers;
  ASSERT_TRUE(
      Call(local_.get(), &admin::Admin::Stub::ListTrainers, admin::ListTrainersRequest(), &trainers)
          .ok());
  EXPECT_EQ(trainers.daemons_size(), kNodes);
  ASSERT_EQ(trainers.trainers_size(), static_cast<int>(kWorld)) << trainers.DebugString();
  for (const auto& t : trainers.trainers()) {
    EXPECT_EQ(t.node_id(), absl::StrCat("n", t.rank()));
    EXPECT_EQ(t.pid(), trainer_pids_[t.rank()]) << t.DebugString();
    EXPECT_FALSE(t.alive());  // the trainers have exited
    EXPECT_GE(t.newest_sealed_step(), committed);
  }

  // Over TCP: nothing without the right token.
  auto tcp = Connect(addresses_[1]);
  admin::GetStatusResponse ignored;
  grpc::Status s =
      Call(tcp.get(), &admin::Admin::Stub::GetStatus, admin::GetStatusRequest(), &ignored);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(absl::StrContains(s.error_message(), "x-tessera-token")) << s.error_message();
  s = Call(tcp.get(), &admin::Admin::Stub::GetStatus, admin::GetStatusRequest(), &ignored,
           "wrong-token-0123456789");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(absl::StrContains(s.error_message(), "wrong cluster token")) << s.error_message();
  admin::GetStatusResponse over_tcp;
  s = Call(tcp.get(), &admin::Admin::Stub::GetStatus, admin::GetStatusRequest(), &over_tcp, kToken);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(over_tcp.self().node_id(), "n1");

  // Bad requests get clear errors.
  versions_request.set_job_id("bad/job");
  s = Call(local_.get(), &admin::Admin::Stub::ListVersions, versions_request, &versions);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  versions_request.set_job_id("no-such-job");
  s = Call(local_.get(), &admin::Admin::Stub::ListVersions, versions_request, &versions);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(absl::StrContains(s.error_message(), "jobs held: " + job)) << s.error_message();
  admin::VerifyRequest bad_verify;
  bad_verify.set_job_id(job);
  bad_verify.set_step(-5);
  admin::VerifyResponse verify_ignored;
  s = Call(local_.get(), &admin::Admin::Stub::Verify, bad_verify, &verify_ignored);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(s.error_message(), "step must be >= 0")) << s.error_message();
  admin::RecoverRequest bad_recover;
  bad_recover.set_job_id(job);
  bad_recover.set_node_id("n9");
  admin::RecoverResponse recover_ignored;
  s = Call(local_.get(), &admin::Admin::Stub::Recover, bad_recover, &recover_ignored);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(absl::StrContains(s.error_message(), "live: n0, n1, n2, n3")) << s.error_message();

  // /metrics on n0.
  std::map<std::string, double> metrics = Scrape(metrics_port_);
  // n0 sealed what rank 0's trainer says it sealed.
  int sealed_by_rank0 = 0;
  for (const auto& line : trainers_[0]->lines()) {
    sealed_by_rank0 += ParseEvent(line, "sealed") ? 1 : 0;
  }
  EXPECT_GE(sealed_by_rank0, 1);
  // The trainer may exit before printing its last seal.
  EXPECT_GE(metrics["tessera_snapshot_seals_total"], sealed_by_rank0);
  EXPECT_LE(metrics["tessera_snapshot_seals_total"], 6);
  EXPECT_GT(metrics["tessera_snapshot_sealed_bytes_total"], 0);
  EXPECT_EQ(metrics["tessera_peers{state=\"alive\"}"], 3);
  EXPECT_EQ(metrics["tessera_peers{state=\"suspected\"}"], 0);
  EXPECT_GE(metrics["tessera_protection_latency_seconds_count"], 1);
  EXPECT_EQ(metrics["tessera_protection_latency_seconds_count"],
            metrics["tessera_protection_latency_seconds_bucket{le=\"+Inf\"}"]);
  EXPECT_GT(metrics["tessera_fragments_held{state=\"sealed\"}"], 0);
  EXPECT_EQ(metrics["tessera_crc_failures_total{kind=\"fragment\"}"], 0);
  EXPECT_GT(metrics["tessera_store_capacity_bytes"], 0);
  // Every fragment held came from a segment created or recycled on this node.
  EXPECT_GE(metrics["tessera_fragment_segments_total{how=\"created\"}"], 1);
  EXPECT_GE(metrics["tessera_fragment_segments_total{how=\"created\"}"] +
                metrics["tessera_fragment_segments_total{how=\"recycled\"}"],
            metrics["tessera_fragments_held{state=\"sealed\"}"]);
  EXPECT_EQ(metrics.count("tessera_fragment_spare_bytes"), 1u);
  EXPECT_EQ(metrics.count("tessera_rendezvous_groups"), 1u);
  EXPECT_EQ(metrics["tessera_rendezvous_groups"], 0);  // no data-parallel restore ran here
}

TEST_F(AdminTest, DrillsCorruptVerifyRecoverAndDropMemory) {
  const std::string job = "admin-drill";
  const int64_t committed = TrainAndProtect(job, 6);
  ASSERT_GE(committed, 0);
  std::mt19937_64 rng(seed_);

  admin::VerifyRequest verify_request;
  verify_request.set_job_id(job);
  verify_request.set_step(committed);
  admin::VerifyResponse verified;
  ASSERT_TRUE(Call(local_.get(), &admin::Admin::Stub::Verify, verify_request, &verified).ok());
  EXPECT_TRUE(verified.ok()) << verified.DebugString();
  EXPECT_EQ(verified.damaged_size(), 0);
  EXPECT_EQ(verified.nodes_size(), kNodes);
  EXPECT_EQ(verified.ranks_size(), static_cast<int>(kWorld));
  // With decode, every rank is rebuilt from k fragments and matches its shard.
  verify_request.set_decode(true);
  verified.Clear();
  ASSERT_TRUE(Call(local_.get(), &admin::Admin::Stub::Verify, verify_request, &verified).ok());
  EXPECT_TRUE(verified.ok()) << verified.DebugString();
  for (const auto& verdict : verified.ranks()) {
    EXPECT_TRUE(verdict.decoded()) << verdict.DebugString();
    EXPECT_NE(verdict.decoded_crc32c(), 0u);
  }
  verify_request.set_decode(false);

  // Not a drill target yet: Corrupt is refused.
  const uint32_t rank = rng() % kWorld;
  admin::ListVersionsRequest versions_request;
  versions_request.set_job_id(job);
  admin::ListVersionsResponse versions;
  ASSERT_TRUE(
      Call(local_.get(), &admin::Admin::Stub::ListVersions, versions_request, &versions).ok());
  std::string holder;
  uint32_t index = 0;
  for (const auto& step : versions.steps()) {
    if (step.step() != committed) continue;
    const auto& r = step.ranks(rank);
    const int pick = static_cast<int>(rng() % r.fragment_indexes_size());
    holder = r.fragment_nodes(pick);
    index = r.fragment_indexes(pick);
  }
  ASSERT_FALSE(holder.empty()) << versions.DebugString();
  admin::CorruptRequest corrupt;
  corrupt.set_node_id(holder);  // forwarded by n0 when it is another node
  corrupt.set_job_id(job);
  corrupt.set_rank(rank);
  corrupt.set_step(committed);
  corrupt.set_target(admin::CorruptRequest::FRAGMENT);
  corrupt.set_fragment_index(index);
  corrupt.set_offset(rng() % 1000);
  admin::CorruptResponse corrupted;
  grpc::Status s = Call(local_.get(), &admin::Admin::Stub::Corrupt, corrupt, &corrupted);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(absl::StrContains(s.error_message(), "not a drill target")) << s.error_message();

  admin::SetDrillTargetRequest mark;
  mark.set_job_id(job);
  mark.set_enabled(true);
  admin::SetDrillTargetResponse marked;
  for (int twice = 0; twice < 2; ++twice) {  // idempotent
    marked.Clear();
    ASSERT_TRUE(Call(local_.get(), &admin::Admin::Stub::SetDrillTarget, mark, &marked).ok());
    EXPECT_EQ(marked.nodes_size(), kNodes) << marked.DebugString();
  }
  admin::GetStatusResponse marked_status;
  ASSERT_TRUE(
      Call(local_.get(), &admin::Admin::Stub::GetStatus, admin::GetStatusRequest(), &marked_status)
          .ok());
  ASSERT_NE(FindJob(marked_status, job), nullptr);
  EXPECT_TRUE(FindJob(marked_status, job)->drill_target());

  s = Call(local_.get(), &admin::Admin::Stub::Corrupt, corrupt, &corrupted);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(corrupted.node_id(), holder);
  EXPECT_EQ(corrupted.new_byte(), corrupted.old_byte() ^ 0xFFu);
  EXPECT_TRUE(absl::StrContains(corrupted.path(), "/" + holder + "/")) << corrupted.path();

  // Verify names exactly the damaged fragment; the rank is still restorable from the others.
  verified.Clear();
  ASSERT_TRUE(Call(local_.get(), &admin::Admin::Stub::Verify, verify_request, &verified).ok());
  EXPECT_FALSE(verified.ok());
  ASSERT_EQ(verified.damaged_size(), 1) << verified.DebugString();
  const admin::Damage& d = verified.damaged(0);
  EXPECT_EQ(d.node_id(), holder);
  EXPECT_EQ(d.kind(), admin::Damage::FRAGMENT);
  EXPECT_EQ(d.rank(), rank);
  EXPECT_EQ(d.step(), committed);
  EXPECT_EQ(d.fragment_index(), index);
  for (const auto& verdict : verified.ranks()) {
    EXPECT_TRUE(verdict.restorable()) << verdict.DebugString();
    if (verdict.rank() == rank) {
      EXPECT_EQ(verdict.fragments_damaged(), 1u);
      EXPECT_EQ(verdict.fragments_ok(), 2u);
    }
  }
  // Decoding uses only fragments that verified, so every rank still decodes.
  verify_request.set_decode(true);
  admin::VerifyResponse decoded;
  ASSERT_TRUE(Call(local_.get(), &admin::Admin::Stub::Verify, verify_request, &decoded).ok());
  for (const auto& verdict : decoded.ranks()) {
    EXPECT_TRUE(verdict.decoded()) << verdict.DebugString();
  }
  verify_request.set_decode(false);

  // A rebuild from fragments on n0 works around the damaged one and matches the shard's CRC.
  admin::RecoverRequest recover;
  recover.set_job_id(job);
  recover.set_rank(rank);
  recover.set_step(committed);
  recover.set_from_fragments(true);
  admin::RecoverResponse recovered;
  s = Call(local_.get(), &admin::Admin::Stub::Recover, recover, &recovered);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(recovered.source(), admin::RecoverResponse::REBUILD);
  EXPECT_TRUE(recovered.crc_matched()) << recovered.DebugString();
  EXPECT_EQ(recovered.expected_crc32c(), recovered.actual_crc32c());
  EXPECT_EQ(recovered.fragment_indexes_size(), 2);
  for (int i = 0; i < recovered.fragment_indexes_size(); ++i) {
    EXPECT_FALSE(recovered.fragment_nodes(i) == holder && recovered.fragment_indexes(i) == index)
        << "the damaged fragment was used: " << recovered.DebugString();
  }

  // Another rank's shard copied whole to n0 (its owner is up).
  const uint32_t other = 1 + rng() % (kWorld - 1);
  recover.set_rank(other);
  recover.set_from_fragments(false);
  recovered.Clear();
  s = Call(local_.get(), &admin::Admin::Stub::Recover, recover, &recovered);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(recovered.source(), admin::RecoverResponse::COPY) << recovered.DebugString();
  EXPECT_EQ(recovered.source_node(), absl::StrCat("n", other));
  EXPECT_EQ(recovered.bytes_moved(), recovered.shard_bytes());
  EXPECT_TRUE(recovered.crc_matched());
  // Again: the copy made the first time is returned, and nothing moves.
  const std::string copied_path = recovered.segment_path();
  recovered.Clear();
  s = Call(local_.get(), &admin::Admin::Stub::Recover, recover, &recovered);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(recovered.source(), admin::RecoverResponse::LOCAL) << recovered.DebugString();
  EXPECT_EQ(recovered.segment_path(), copied_path);
  EXPECT_EQ(recovered.bytes_moved(), 0u);
  EXPECT_TRUE(recovered.crc_matched());

  // A flipped byte in n0's own slot is named as a damaged shard.
  corrupt.set_node_id("");
  corrupt.set_rank(0);
  corrupt.set_target(admin::CorruptRequest::SLOT);
  s = Call(local_.get(), &admin::Admin::Stub::Corrupt, corrupt, &corrupted);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_TRUE(absl::StartsWith(corrupted.path(), daemons_[0]->store_dir())) << corrupted.path();
  verified.Clear();
  ASSERT_TRUE(Call(local_.get(), &admin::Admin::Stub::Verify, verify_request, &verified).ok());
  bool shard_named = false;
  for (const auto& damage : verified.damaged()) {
    shard_named |= damage.kind() == admin::Damage::SHARD && damage.node_id() == "n0" &&
                   damage.rank() == 0 && damage.step() == committed;
  }
  EXPECT_TRUE(shard_named) << verified.DebugString();
  std::map<std::string, double> metrics = Scrape(metrics_port_);
  EXPECT_GE(metrics["tessera_crc_failures_total{kind=\"slot\"}"], 1);

  // A rebuild from fragments on n0 repairs its damaged slot in place; a second finds it intact.
  recover.set_rank(0);
  recover.set_from_fragments(true);
  recover.clear_node_id();
  recovered.Clear();
  s = Call(local_.get(), &admin::Admin::Stub::Recover, recover, &recovered);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_TRUE(recovered.crc_matched());
  EXPECT_TRUE(recovered.repaired()) << recovered.DebugString();
  recovered.Clear();
  s = Call(local_.get(), &admin::Admin::Stub::Recover, recover, &recovered);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_FALSE(recovered.repaired());
  verified.Clear();
  ASSERT_TRUE(Call(local_.get(), &admin::Admin::Stub::Verify, verify_request, &verified).ok());
  for (const auto& damage : verified.damaged()) {
    EXPECT_NE(damage.kind(), admin::Damage::SHARD) << verified.DebugString();
  }

  // n3 loses its memory: refused without the right confirmation, then done.
  admin::GetStatusResponse before;
  ASSERT_TRUE(
      Call(local_.get(), &admin::Admin::Stub::GetStatus, admin::GetStatusRequest(), &before).ok());
  uint64_t old_incarnation = 0;
  int32_t old_pid = 0;
  for (const auto& m : before.members()) {
    if (m.node_id() == "n3") {
      old_incarnation = m.incarnation();
      old_pid = m.info().pid();
    }
  }
  admin::DropMemoryRequest drop;
  drop.set_node_id("n3");
  drop.set_confirm_node_id("n2");
  admin::DropMemoryResponse dropped;
  s = Call(local_.get(), &admin::Admin::Stub::DropMemory, drop, &dropped);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(absl::StrContains(s.error_message(), "nothing was dropped")) << s.error_message();
  drop.set_confirm_node_id("n3");
  s = Call(local_.get(), &admin::Admin::Stub::DropMemory, drop, &dropped);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(dropped.node_id(), "n3");
  EXPECT_EQ(dropped.old_incarnation(), old_incarnation);
  EXPECT_GE(dropped.slots_deleted(), 1u);
  EXPECT_GE(dropped.fragments_deleted(), 1u);

  // n3 comes back as a new incarnation of the same process, with nothing of rank 3 left on it.
  bool back = false;
  for (int i = 0; i < 100 && !back; ++i) {
    std::this_thread::sleep_for(milliseconds(100));
    admin::GetStatusResponse after;
    if (!Call(local_.get(), &admin::Admin::Stub::GetStatus, admin::GetStatusRequest(), &after)
             .ok()) {
      continue;
    }
    for (const auto& m : after.members()) {
      if (m.node_id() == "n3" && m.state() == admin::MemberStatus::ALIVE &&
          m.incarnation() > old_incarnation && m.info().node_id() == "n3") {
        back = true;
        EXPECT_EQ(m.info().pid(), old_pid);
        EXPECT_EQ(m.info().memory().slot_bytes(), 0u);
      }
    }
  }
  ASSERT_TRUE(back) << "n3 did not come back; its log:\n" << daemons_[3]->LogTail();
  // Its own agent socket serves once it has heard the other members.
  auto n3 = Connect("unix:" + daemons_[3]->socket_path());
  admin::GetStatusRequest local_status;
  local_status.set_local_only(true);
  int n3_sees = 0;
  for (int i = 0; i < 100 && n3_sees < kNodes - 1; ++i) {
    admin::GetStatusResponse view;
    n3_sees = 0;
    if (Call(n3.get(), &admin::Admin::Stub::GetStatus, local_status, &view).ok()) {
      for (const auto& m : view.members()) n3_sees += m.state() == admin::MemberStatus::ALIVE;
    }
    if (n3_sees < kNodes - 1) std::this_thread::sleep_for(milliseconds(100));
  }
  EXPECT_EQ(n3_sees, kNodes - 1) << daemons_[3]->LogTail();
  admin::GetStatusResponse after;
  ASSERT_TRUE(
      Call(local_.get(), &admin::Admin::Stub::GetStatus, admin::GetStatusRequest(), &after).ok());
  const admin::JobStatus* j = FindJob(after, job);
  ASSERT_NE(j, nullptr);
  EXPECT_NE(j->health(), admin::PROTECTED) << j->DebugString();

  // Rank 3 rebuilt on the replacement n3 from the fragments on n0..n2.
  recover.set_node_id("n3");
  recover.set_rank(3);
  recover.set_from_fragments(false);
  recovered.Clear();
  s = Call(local_.get(), &admin::Admin::Stub::Recover, recover, &recovered);
  ASSERT_TRUE(s.ok()) << s.error_message() << "\nn3 log:\n" << daemons_[3]->LogTail();
  EXPECT_EQ(recovered.node_id(), "n3");
  EXPECT_EQ(recovered.source(), admin::RecoverResponse::REBUILD) << recovered.DebugString();
  EXPECT_TRUE(recovered.crc_matched());
  EXPECT_GT(recovered.bytes_moved(), 0u);
  std::printf("rank 3 of step %lld rebuilt on n3 after DropMemory: %llu bytes moved in %llu us\n",
              static_cast<long long>(committed),
              static_cast<unsigned long long>(recovered.bytes_moved()),
              static_cast<unsigned long long>(recovered.duration_us()));
}

// A trainer keeps training through its daemon losing its memory: it registers again with the
// new incarnation and seals new steps, and the cluster protects them again.
TEST_F(AdminTest, TrainingContinuesThroughDropMemory) {
  const std::string job = "admin-lose";
  auto trainer = Process::Start(
      {BinaryPath("tests/trainer"), "--socket=" + daemons_[2]->socket_path(), "--job=" + job,
       absl::StrCat("--seed=", seed_), "--rank=0", "--world=1", "--tensors=3", "--min-bytes=1000",
       "--max-bytes=200000", "--total-bytes=400000", "--steps=400", "--step-sleep-ms=20"});
  ASSERT_TRUE(trainer->ReadUntil([](const std::string& l) { return ParseEvent(l, "sealed") >= 3; },
                                 seconds(60)))
      << absl::StrJoin(trainer->lines(), "\n");
  admin::DropMemoryRequest drop;
  drop.set_node_id("n2");
  drop.set_confirm_node_id("n2");
  admin::DropMemoryResponse dropped;
  grpc::Status s = Call(local_.get(), &admin::Admin::Stub::DropMemory, drop, &dropped);
  ASSERT_TRUE(s.ok()) << s.error_message();
  const int64_t sealed_before = LastEvent(trainer->lines(), "sealed");

  admin::ListTrainersRequest request;
  request.set_job_id(job);
  bool resumed = false;
  for (int i = 0; i < 200 && !resumed; ++i) {
    std::this_thread::sleep_for(milliseconds(100));
    admin::ListTrainersResponse trainers;
    if (!Call(local_.get(), &admin::Admin::Stub::ListTrainers, request, &trainers).ok()) continue;
    for (const auto& t : trainers.trainers()) {
      resumed |= t.node_id() == "n2" && t.pid() == trainer->pid() && t.alive() && t.registered() &&
                 t.newest_sealed_step() > sealed_before + 2;
    }
    for (const auto& d : trainers.daemons()) {
      if (d.node_id() == "n2") EXPECT_GE(d.incarnation(), dropped.old_incarnation());
    }
  }
  EXPECT_TRUE(resumed) << absl::StrJoin(trainer->lines(), "\n") << "\nn2 log:\n"
                       << daemons_[2]->LogTail();
  trainer->Signal(SIGKILL);
  trainer->Wait();
}

TEST(AdminStandaloneTest, StandaloneAndTokenlessDaemonsSayWhatTheyCannotDo) {
  TempRoot root;
  DaemonProcess solo(root.path(), "solo", uint64_t{64} << 20);
  std::string error;
  ASSERT_TRUE(solo.Start(&error)) << error;
  auto stub = Connect("unix:" + solo.socket_path());
  admin::GetStatusResponse status;
  ASSERT_TRUE(
      Call(stub.get(), &admin::Admin::Stub::GetStatus, admin::GetStatusRequest(), &status).ok());
  ASSERT_EQ(status.members_size(), 1);
  EXPECT_EQ(status.self().peer_address(), "");
  ASSERT_EQ(status.warnings_size(), 1);
  EXPECT_TRUE(absl::StrContains(status.warnings(0), "standalone")) << status.warnings(0);
  admin::RecoverRequest recover;
  recover.set_job_id("any-job");
  recover.set_step(1);
  recover.set_from_fragments(true);
  admin::RecoverResponse recovered;
  grpc::Status s = Call(stub.get(), &admin::Admin::Stub::Recover, recover, &recovered);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  EXPECT_TRUE(absl::StrContains(s.error_message(), "standalone")) << s.error_message();
  // A standalone daemon loses its memory too, and comes back as a new incarnation.
  admin::DropMemoryRequest drop;
  drop.set_confirm_node_id("solo");
  admin::DropMemoryResponse dropped;
  ASSERT_TRUE(Call(stub.get(), &admin::Admin::Stub::DropMemory, drop, &dropped).ok());
  bool back = false;
  for (int i = 0; i < 100 && !back; ++i) {
    std::this_thread::sleep_for(milliseconds(100));
    auto again = Connect("unix:" + solo.socket_path());
    admin::GetStatusResponse after;
    back =
        Call(again.get(), &admin::Admin::Stub::GetStatus, admin::GetStatusRequest(), &after).ok() &&
        after.self().incarnation() > dropped.old_incarnation();
  }
  EXPECT_TRUE(back) << solo.LogTail();

  // Two daemons without cluster.token: no admin over TCP, and status says why it is partial.
  const std::vector<std::string> addresses = {absl::StrCat("127.0.0.1:", FreePort()),
                                              absl::StrCat("127.0.0.1:", FreePort())};
  std::vector<std::unique_ptr<DaemonProcess>> pair;
  for (int i = 0; i < 2; ++i) {
    pair.push_back(std::make_unique<DaemonProcess>(
        root.path(), absl::StrCat("t", i), uint64_t{64} << 20,
        std::vector<std::string>{"--set", "peer.listen_address=" + addresses[i], "--set",
                                 "cluster.members=" + absl::StrJoin(addresses, ","), "--set",
                                 "cluster.insecure=true", "--set",
                                 "liveness.heartbeat_ms=100", "--set",
                                 "liveness.timeout_ms=1000"}));
    ASSERT_TRUE(pair.back()->Start(&error)) << error;
  }
  std::this_thread::sleep_for(milliseconds(600));
  auto tcp = Connect(addresses[1]);
  s = Call(tcp.get(), &admin::Admin::Stub::GetStatus, admin::GetStatusRequest(), &status,
           "some-token-0123456789");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(absl::StrContains(s.error_message(), "cluster.token is not set"))
      << s.error_message();
  auto local = Connect("unix:" + pair[0]->socket_path());
  status.Clear();
  ASSERT_TRUE(
      Call(local.get(), &admin::Admin::Stub::GetStatus, admin::GetStatusRequest(), &status).ok());
  ASSERT_EQ(status.members_size(), 2) << status.DebugString();
  EXPECT_EQ(status.members(1).state(), admin::MemberStatus::ALIVE);
  EXPECT_TRUE(absl::StrContains(status.members(1).error(), "cluster.token is not set"))
      << status.DebugString();
  ASSERT_EQ(status.errors_size(), 1);
  EXPECT_EQ(status.errors(0).node_id(), "t1");
  bool warned = false;
  for (const auto& w : status.warnings()) warned |= absl::StrContains(w, "cluster.token");
  EXPECT_TRUE(warned) << status.DebugString();
}

}  // namespace
}  // namespace tessera::testing
