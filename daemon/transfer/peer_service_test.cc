// PeerService over a real FragmentStore and SnapshotStore in /dev/shm, served by a real gRPC
// server on 127.0.0.1:0 in this process and reached through the real GrpcPeerClient; plus the
// FakePeerClient's fault injection.
#include "daemon/transfer/peer_service.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/synchronization/notification.h"
#include "common/crc32c.h"
#include "common/log_capture.h"
#include "daemon/refusals.h"
#include "daemon/transfer/peer_client.h"
#include "ec/erasure_codec.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

FragmentMeta MetaFor(uint64_t shard_bytes, uint64_t incarnation = 11, uint32_t k = 3) {
  FragmentMeta m;
  m.owner_incarnation = incarnation;
  m.ec_k = k;
  m.ec_m = 2;
  m.shard_bytes = shard_bytes;
  m.fragment_bytes = ErasureCodec::FragmentBytes(shard_bytes, k);
  m.shard_crc32c = 0xC0FFEE;
  m.epoch = 42;  // travels with every write and read (checked by the meta comparisons)
  return m;
}

// Collects a fetched shard in memory.
class VectorSink final : public ShardSink {
 public:
  absl::Status Begin(const ShardInfo& info) override {
    ++begins;
    bytes.assign(info.payload_bytes, 0);
    return absl::OkStatus();
  }
  absl::Status Write(uint64_t offset, const uint8_t* data, size_t size) override {
    if (offset + size > bytes.size()) return absl::OutOfRangeError("past the end");
    std::memcpy(bytes.data() + offset, data, size);
    return absl::OkStatus();
  }
  std::vector<uint8_t> bytes;
  int begins = 0;
};

class PeerServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/dev/shm/tessera-peer-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    root_ = tmpl;
    dir_ = root_ + "/node1";
    seed_ = std::random_device{}();
    rng_.seed(seed_);
    std::printf("seed=%llu\n", static_cast<unsigned long long>(seed_));

    budget_ = std::make_unique<CapacityBudget>(uint64_t{512} << 20);
    FragmentStore::Options fo;
    fo.directory = dir_;
    fo.budget = budget_.get();
    auto fragments = FragmentStore::Open(fo);
    ASSERT_TRUE(fragments.ok()) << fragments.status();
    fragments_ = std::move(*fragments);

    SnapshotStore::Options so;
    so.directory = dir_;  // slots and fragments share the node's directory
    so.capacity_bytes = uint64_t{256} << 20;
    so.crc_threads = 2;
    so.process_alive = [](pid_t, uint64_t) { return true; };
    auto snapshots = SnapshotStore::Open(so);
    ASSERT_TRUE(snapshots.ok()) << snapshots.status();
    snapshots_ = std::move(*snapshots);
    shard_source_ = std::make_unique<SnapshotStoreShardSource>(snapshots_.get());

    PeerService::Options options;
    options.self = MemberInfo{"node-1", 1001, "127.0.0.1"};
    options.on_heartbeat = [this](const HeartbeatMessage& m) -> absl::StatusOr<HeartbeatReply> {
      ++heartbeats_;
      last_heartbeat_from_ = m.from.node_id;
      last_heartbeat_ = m;
      if (m.from.node_id == "zombie") {
        return absl::FailedPreconditionError("node 'zombie' incarnation 1 is fenced");
      }
      HeartbeatReply reply;
      reply.peer = MemberInfo{"node-1", 1001, ""};
      reply.version = 3;
      reply.known_members = 2;
      reply.updates = {SwimUpdate{SwimState::kAlive, "node-1", 1001, 3, "a:1"},
                       SwimUpdate{SwimState::kSuspect, "node-2", 2002, 5, "b:2"}};
      return reply;
    };
    service_ = std::make_unique<PeerService>(fragments_.get(), shard_source_.get(), options);
    grpc::ServerBuilder builder;
    PeerService::ConfigureServerBuilder(&builder);
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_GT(port_, 0);
    address_ = "127.0.0.1:" + std::to_string(port_);

    GrpcPeerClient::Options co;
    co.channels_per_peer = 4;
    co.chunk_bytes = 1 << 20;
    co.min_range_bytes = 2 << 20;
    co.max_attempts = 2;
    co.initial_backoff = absl::Milliseconds(10);
    auto client = GrpcPeerClient::Create(co);
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = std::move(*client);
  }

  void TearDown() override {
    client_.reset();
    if (server_) server_->Shutdown();
    server_.reset();
    service_.reset();
    shard_source_.reset();
    snapshots_.reset();
    fragments_.reset();
    std::filesystem::remove_all(root_);
  }

  std::vector<uint8_t> RandomBytes(size_t n) {
    std::vector<uint8_t> v(n);
    for (size_t i = 0; i < n; i += 8) {
      const uint64_t x = rng_();
      std::memcpy(v.data() + i, &x, std::min<size_t>(8, n - i));
    }
    return v;
  }

  // Seals a snapshot of rank `rank` at `step` in the local SnapshotStore, as an agent would.
  // Returns the whole payload (data, then manifest).
  std::vector<uint8_t> SealSnapshot(uint32_t rank, int64_t step, uint64_t tensor_bytes) {
    EntrySpec e;
    e.set_name("w");
    e.set_dtype("uint8");
    e.add_shape(static_cast<int64_t>(tensor_bytes));
    e.set_nbytes(tensor_bytes);
    e.set_kind(ENTRY_KIND_TENSOR);
    const Caller caller{getuid(), getgid(), static_cast<pid_t>(1000 + rank)};
    auto reg = snapshots_->Register("job-a", rank, 4, {e}, caller);
    EXPECT_TRUE(reg.ok()) << reg.status();
    auto slot = snapshots_->BeginSnapshot("job-a", rank, step, caller);
    EXPECT_TRUE(slot.ok()) << slot.status();
    auto seg = Segment::Open(reg->slot_paths[*slot], true);
    EXPECT_TRUE(seg.ok());
    auto data = RandomBytes(tensor_bytes);
    std::memcpy((*seg)->payload() + reg->layout.entry_offsets[0], data.data(), tensor_bytes);
    ShardManifest m;
    m.set_layout_version(kSegmentLayoutVersion);
    m.set_job_id("job-a");
    m.set_rank(rank);
    m.set_world_size(4);
    m.set_step(step);
    m.set_data_bytes(reg->layout.data_bytes);
    ManifestEntry* me = m.add_entries();
    *me->mutable_spec() = e;
    me->set_offset(reg->layout.entry_offsets[0]);
    me->set_length(tensor_bytes);
    const std::string manifest = m.SerializeAsString();
    std::memcpy((*seg)->payload() + reg->layout.manifest_offset, manifest.data(), manifest.size());
    auto sealed = snapshots_->SealSnapshot("job-a", rank, step, manifest.size(), caller);
    EXPECT_TRUE(sealed.ok()) << sealed.status();
    const uint8_t* p = (*seg)->payload();
    return std::vector<uint8_t>(p, p + sealed->payload_bytes);
  }

  std::string root_;
  std::string dir_;
  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
  std::unique_ptr<CapacityBudget> budget_;
  std::unique_ptr<FragmentStore> fragments_;
  std::unique_ptr<SnapshotStore> snapshots_;
  std::unique_ptr<SnapshotStoreShardSource> shard_source_;
  std::unique_ptr<PeerService> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::string address_;
  std::unique_ptr<GrpcPeerClient> client_;
  std::atomic<int> heartbeats_{0};
  std::string last_heartbeat_from_;
  HeartbeatMessage last_heartbeat_;
};

TEST_F(PeerServiceTest, PutAndGetFragmentsBitExactEachTwice) {
  // A small fragment (one stream, sealed by its last chunk), one split over 4 channels, and one
  // whose size is not a multiple of the chunk size.
  for (uint64_t shard : {uint64_t{5000}, uint64_t{30} << 20, (uint64_t{21} << 20) + 12345}) {
    SCOPED_TRACE(shard);
    const FragmentKey key{"job-a", 2, static_cast<int64_t>(shard % 1000), 4};
    const FragmentMeta meta = MetaFor(shard);
    auto data = RandomBytes(meta.fragment_bytes);
    const uint32_t crc = Crc32c(data.data(), data.size());
    for (int i = 0; i < 2; ++i) {
      auto put = client_->PutFragment(address_, key, meta, data.data(), data.size());
      ASSERT_TRUE(put.ok()) << put.status();
      EXPECT_EQ(put->state, SegmentState::kSealed);
      EXPECT_EQ(put->fragment_crc32c, crc);
    }
    auto view = fragments_->Get(key);
    ASSERT_TRUE(view.ok()) << view.status();
    ASSERT_EQ(0, std::memcmp(view->data(), data.data(), data.size())) << "seed " << seed_;

    for (int i = 0; i < 2; ++i) {
      std::vector<uint8_t> got(data.size() + 1000, 0xAB);  // more room than needed
      auto status = client_->GetFragment(address_, key, i == 0 ? 0 : 11, got.data(), got.size());
      ASSERT_TRUE(status.ok()) << status.status();
      EXPECT_EQ(status->fragment_crc32c, crc);
      EXPECT_EQ(status->meta.fragment_bytes, meta.fragment_bytes);
      EXPECT_EQ(status->meta.shard_bytes, meta.shard_bytes);
      ASSERT_EQ(0, std::memcmp(got.data(), data.data(), data.size())) << "seed " << seed_;
      EXPECT_EQ(got[data.size()], 0xAB);
    }
    std::vector<uint8_t> small(data.size() - 64);
    EXPECT_EQ(client_->GetFragment(address_, key, 0, small.data(), small.size()).status().code(),
              absl::StatusCode::kInvalidArgument);
  }
  EXPECT_EQ(fragments_->stats().seals, 3u);
  EXPECT_EQ(
      client_->GetFragment(address_, FragmentKey{"job-a", 9, 9, 0}, 0, nullptr, 0).status().code(),
      absl::StatusCode::kInvalidArgument);
  std::vector<uint8_t> buf(4096);
  auto missing =
      client_->GetFragment(address_, FragmentKey{"job-a", 9, 9, 0}, 0, buf.data(), buf.size());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound) << missing.status();
}

TEST_F(PeerServiceTest, CorruptedChunkIsDataLossAndNothingIsSealed) {
  // A plain protobuf client (the generated stub, no zero-copy tricks) speaks the same protocol.
  auto channel = grpc::CreateChannel(address_, grpc::InsecureChannelCredentials());
  auto stub = peer::Peer::NewStub(channel);
  const FragmentKey key{"job-a", 1, 7, 0};
  const FragmentMeta meta = MetaFor(6 << 20);
  auto data = RandomBytes(meta.fragment_bytes);
  const size_t chunk = 1 << 20;

  auto send = [&](bool corrupt, uint32_t fragment_crc) {
    grpc::ClientContext context;
    peer::PutFragmentResponse response;
    auto writer = stub->PutFragment(&context, &response);
    for (size_t off = 0; off < data.size(); off += chunk) {
      peer::FragmentChunk m;
      if (off == 0) {
        peer_wire::ToProto(key, meta.owner_incarnation, m.mutable_key());
        peer_wire::ToProto(meta, m.mutable_info());
      }
      const size_t len = std::min(chunk, data.size() - off);
      m.set_offset(off);
      m.set_crc32c(Crc32c(data.data() + off, len));
      m.set_data(std::string(reinterpret_cast<const char*>(data.data() + off), len));
      if (corrupt && off == chunk) (*m.mutable_data())[777] ^= 0x04;  // flipped in transit
      if (off + len == data.size()) {
        m.set_seal(true);
        m.set_fragment_crc32c(fragment_crc);
      }
      if (!writer->Write(m)) break;
    }
    writer->WritesDone();
    grpc::Status status = writer->Finish();
    return std::make_pair(status, response);
  };

  const uint32_t crc = Crc32c(data.data(), data.size());
  for (int i = 0; i < 2; ++i) {
    auto [status, response] = send(/*corrupt=*/true, crc);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::DATA_LOSS) << status.error_message();
    EXPECT_NE(status.error_message().find("nothing was written"), std::string::npos);
    auto listed = fragments_->List("job-a");
    ASSERT_EQ(listed.size(), 1u);
    EXPECT_EQ(listed[0].state, SegmentState::kWriting);
    EXPECT_EQ(listed[0].bytes_received, chunk);  // only the chunk before the damaged one
  }
  // Every chunk intact, but the sender's whole-fragment CRC disagrees: not sealed either.
  for (int i = 0; i < 2; ++i) {
    auto [status, response] = send(/*corrupt=*/false, crc ^ 1);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::DATA_LOSS) << status.error_message();
    EXPECT_EQ(fragments_->Get(key).status().code(), absl::StatusCode::kFailedPrecondition);
  }
  auto held = client_->ListHeld(address_, "job-a");
  ASSERT_TRUE(held.ok()) << held.status();
  ASSERT_EQ(held->fragments.size(), 1u);
  EXPECT_EQ(held->fragments[0].state, SegmentState::kWriting);

  // Sent intact, twice: sealed, and the response says so.
  for (int i = 0; i < 2; ++i) {
    auto [status, response] = send(/*corrupt=*/false, crc);
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_TRUE(response.sealed());
    EXPECT_EQ(response.fragment_crc32c(), crc);
  }
  EXPECT_TRUE(fragments_->VerifyFragment(key).ok());

  // The plain client reads it back as ordinary DataChunk messages.
  grpc::ClientContext context;
  peer::GetFragmentRequest request;
  peer_wire::ToProto(key, 0, request.mutable_key());
  auto reader = stub->GetFragment(&context, request);
  peer::DataChunk m;
  std::string got;
  while (reader->Read(&m)) {
    EXPECT_EQ(m.offset(), got.size());
    EXPECT_EQ(m.crc32c(), Crc32c(m.data().data(), m.data().size()));
    got += m.data();
  }
  ASSERT_TRUE(reader->Finish().ok());
  ASSERT_EQ(got.size(), data.size());
  EXPECT_EQ(0, std::memcmp(got.data(), data.data(), data.size()));
}

TEST_F(PeerServiceTest, DamagedStoredFragmentIsDataLossOnRead) {
  const FragmentKey key{"job-a", 1, 8, 2};
  const FragmentMeta meta = MetaFor(9 << 20);
  auto data = RandomBytes(meta.fragment_bytes);
  ASSERT_TRUE(client_->PutFragment(address_, key, meta, data.data(), data.size()).ok());
  // A bit flips in the segment after it was sealed.
  bool flipped = false;
  for (const auto& f : std::filesystem::directory_iterator(dir_)) {
    if (f.path().extension() != ".frag") continue;
    // Spares kept for recycling (EMPTY, no header CRC, possibly still being created in the
    // background) do not open as segments; the fragment itself must.
    auto seg = Segment::Open(f.path().string(), true);
    if (!seg.ok()) continue;
    if ((*seg)->header()->step == 8) {
      (*seg)->payload()[meta.fragment_bytes / 2] ^= 0x20;
      flipped = true;
    }
  }
  ASSERT_TRUE(flipped);
  std::vector<uint8_t> got(data.size());
  for (int i = 0; i < 2; ++i) {
    auto status = client_->GetFragment(address_, key, 0, got.data(), got.size());
    EXPECT_EQ(status.status().code(), absl::StatusCode::kDataLoss) << status.status();
  }
  EXPECT_EQ(fragments_->VerifyFragment(key).code(), absl::StatusCode::kDataLoss);
}

TEST_F(PeerServiceTest, FetchShardStreamsTheSealedSlotEachTwice) {
  const auto payload = SealSnapshot(/*rank=*/3, /*step=*/40, /*tensor_bytes=*/(5 << 20) + 333);
  for (int64_t step : {int64_t{40}, int64_t{-1}}) {
    VectorSink sink;
    auto info = client_->FetchShard(address_, "job-a", 3, step, &sink);
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_EQ(info->step, 40);
    EXPECT_EQ(info->rank, 3u);
    EXPECT_EQ(info->world_size, 4u);
    EXPECT_EQ(info->payload_bytes, payload.size());
    EXPECT_EQ(info->payload_crc32c, Crc32c(payload.data(), payload.size()));
    EXPECT_GT(info->manifest_bytes, 0u);
    EXPECT_EQ(info->manifest_offset + info->manifest_bytes, payload.size());
    EXPECT_EQ(sink.begins, 1);
    ASSERT_TRUE(sink.bytes == payload) << "seed " << seed_;
  }
  VectorSink sink;
  auto missing = client_->FetchShard(address_, "job-a", 3, 41, &sink);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound) << missing.status();
  EXPECT_NE(missing.status().message().find("40"), std::string::npos) << missing.status();
  EXPECT_EQ(client_->FetchShard(address_, "job/a", 3, 41, &sink).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// A write of a step from an abandoned history (an older epoch) is refused, with the epoch held,
// whatever the writer's incarnation; a newer epoch replaces the held fragment.
TEST_F(PeerServiceTest, AFragmentOfAnOlderEpochIsRefusedWithTheEpochHeld) {
  const FragmentKey key{"job-e", 2, 30, 1};
  const FragmentMeta held = MetaFor(1 << 20, /*incarnation=*/500);
  const auto data = RandomBytes(held.fragment_bytes);
  ASSERT_TRUE(client_->PutFragment(address_, key, held, data.data(), data.size()).ok());

  FragmentMeta stale = MetaFor(1 << 20, /*incarnation=*/900);
  stale.epoch = held.epoch - 1;
  const auto other = RandomBytes(stale.fragment_bytes);
  auto refused = client_->PutFragment(address_, key, stale, other.data(), other.size());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
  EXPECT_NE(refused.status().message().find(
                absl::StrCat("epoch ", held.epoch, "; epoch ", stale.epoch, " is older")),
            std::string::npos)
      << refused.status();
  auto view = fragments_->Get(key);
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_EQ(std::memcmp(view->data(), data.data(), data.size()), 0) << "seed " << seed_;

  FragmentMeta newer = MetaFor(1 << 20, /*incarnation=*/100);
  newer.epoch = held.epoch + 1;
  ASSERT_TRUE(client_->PutFragment(address_, key, newer, other.data(), other.size()).ok());
  auto listed = client_->ListHeld(address_, "job-e");
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->fragments.size(), 1u);
  EXPECT_EQ(listed->fragments[0].meta, newer);
  view = fragments_->Get(key);
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_EQ(std::memcmp(view->data(), other.data(), other.size()), 0) << "seed " << seed_;
}

TEST_F(PeerServiceTest, ListHeldShowsFragmentsAndShardsEachTwice) {
  const auto payload = SealSnapshot(/*rank=*/0, /*step=*/12, /*tensor_bytes=*/100000);
  const FragmentMeta meta = MetaFor(3 << 20);
  auto data = RandomBytes(meta.fragment_bytes);
  for (uint32_t index : {0u, 3u}) {
    ASSERT_TRUE(client_
                    ->PutFragment(address_, FragmentKey{"job-a", 1, 12, index}, meta, data.data(),
                                  data.size())
                    .ok());
  }
  ASSERT_TRUE(
      client_->PutFragment(address_, FragmentKey{"job-b", 1, 12, 0}, meta, data.data(), data.size())
          .ok());
  for (int i = 0; i < 2; ++i) {
    auto held = client_->ListHeld(address_, "job-a");
    ASSERT_TRUE(held.ok()) << held.status();
    ASSERT_EQ(held->fragments.size(), 2u);
    for (const FragmentStatus& f : held->fragments) {
      EXPECT_EQ(f.key.job_id, "job-a");
      EXPECT_EQ(f.key.step, 12);
      EXPECT_EQ(f.state, SegmentState::kSealed);
      EXPECT_EQ(f.meta, meta);
      EXPECT_EQ(f.fragment_crc32c, Crc32c(data.data(), data.size()));
      EXPECT_EQ(f.bytes_received, meta.fragment_bytes);
    }
    EXPECT_EQ(held->fragments[1].key.fragment_index, 3u);
    ASSERT_EQ(held->shards.size(), 1u);
    EXPECT_EQ(held->shards[0].rank, 0u);
    EXPECT_EQ(held->shards[0].step, 12);
    EXPECT_EQ(held->shards[0].payload_crc32c, Crc32c(payload.data(), payload.size()));
  }
  auto all = client_->ListHeld(address_, "");
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(all->fragments.size(), 3u);
  EXPECT_EQ(client_->ListHeld(address_, "bad job").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(PeerServiceTest, HeartbeatEachTwice) {
  // Every SWIM field crosses the wire both ways.
  HeartbeatMessage hb;
  hb.from = MemberInfo{"node-0", 77, "127.0.0.1:1"};
  hb.kind = HeartbeatMessage::Kind::kPingReq;
  hb.seq = 41;
  hb.version = 2;
  hb.probe_seq = 40;
  hb.target = MemberInfo{"node-5", 55, "e:5"};
  hb.known_members = 9;
  hb.updates = {SwimUpdate{SwimState::kDead, "node-7", 70, 4, "g:7"}};
  for (int i = 0; i < 2; ++i) {
    auto reply = client_->Heartbeat(address_, hb);
    ASSERT_TRUE(reply.ok()) << reply.status();
    EXPECT_EQ(reply->peer.node_id, "node-1");
    EXPECT_EQ(reply->peer.incarnation, 1001u);
    EXPECT_EQ(reply->peer.address, address_) << "the address the request went to";
    EXPECT_EQ(reply->version, 3u);
    EXPECT_EQ(reply->known_members, 2u);
    ASSERT_EQ(reply->updates.size(), 2u);
    EXPECT_EQ(reply->updates[1].node_id, "node-2");
    EXPECT_EQ(reply->updates[1].incarnation, 2002u);
    EXPECT_EQ(reply->updates[1].version, 5u);
    EXPECT_EQ(reply->updates[1].state, SwimState::kSuspect);
    EXPECT_EQ(reply->updates[1].address, "b:2");
  }
  EXPECT_EQ(heartbeats_.load(), 2);
  EXPECT_EQ(last_heartbeat_from_, "node-0");
  EXPECT_EQ(last_heartbeat_.kind, HeartbeatMessage::Kind::kPingReq);
  EXPECT_EQ(last_heartbeat_.seq, 41u);
  EXPECT_EQ(last_heartbeat_.version, 2u);
  EXPECT_EQ(last_heartbeat_.probe_seq, 40u);
  EXPECT_EQ(last_heartbeat_.target.node_id, "node-5");
  EXPECT_EQ(last_heartbeat_.target.incarnation, 55u);
  EXPECT_EQ(last_heartbeat_.target.address, "e:5");
  EXPECT_EQ(last_heartbeat_.known_members, 9u);
  ASSERT_EQ(last_heartbeat_.updates.size(), 1u);
  EXPECT_EQ(last_heartbeat_.updates[0].state, SwimState::kDead);
  EXPECT_EQ(last_heartbeat_.updates[0].node_id, "node-7");
  EXPECT_EQ(last_heartbeat_.updates[0].version, 4u);
  // The handler's refusal reaches the caller with its code.
  hb.from.node_id = "zombie";
  EXPECT_EQ(client_->Heartbeat(address_, hb).status().code(),
            absl::StatusCode::kFailedPrecondition);
  hb.from.incarnation = 0;
  EXPECT_EQ(client_->Heartbeat(address_, hb).status().code(), absl::StatusCode::kInvalidArgument);
}

// A peer repeating a refused call: each refusal is counted by method and code, and logged at
// most 20 lines per 10 s of that kind (refusals.h), however many come.
TEST_F(PeerServiceTest, RefusedCallsAreCountedAndTheirLogLinesLimited) {
  LogCapture log("peer-service");
  const uint64_t before = RefusalCount("peer", "Heartbeat", absl::StatusCode::kFailedPrecondition);
  HeartbeatMessage hb;
  hb.from = MemberInfo{"zombie", 1, "127.0.0.1:1"};
  for (int i = 0; i < 60; ++i) {
    EXPECT_EQ(client_->Heartbeat(address_, hb).status().code(),
              absl::StatusCode::kFailedPrecondition);
  }
  EXPECT_EQ(RefusalCount("peer", "Heartbeat", absl::StatusCode::kFailedPrecondition), before + 60);
  const size_t lines = log.Count("Heartbeat: FAILED_PRECONDITION");
  EXPECT_GE(lines, 1u);
  EXPECT_LE(lines, 20u);
  // A missing fragment is another kind, counted apart.
  std::vector<uint8_t> buffer(1 << 20);
  EXPECT_EQ(client_
                ->GetFragment(address_, FragmentKey{"no-such-job", 0, 1, 0}, 0, buffer.data(),
                              buffer.size())
                .status()
                .code(),
            absl::StatusCode::kNotFound);
  EXPECT_GE(RefusalCount("peer", "GetFragment", absl::StatusCode::kNotFound), 1u);
}

TEST_F(PeerServiceTest, UnreachablePeerIsUnavailableAfterRetries) {
  // A port bound but not listening for the whole test: connections are refused, and no other
  // process can start listening there meanwhile.
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  absl::Cleanup closer = [fd] { close(fd); };
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  socklen_t len = sizeof(addr);
  ASSERT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const int port = ntohs(addr.sin_port);
  const std::string nowhere = "127.0.0.1:" + std::to_string(port);
  const FragmentMeta meta = MetaFor(1000);
  auto data = RandomBytes(meta.fragment_bytes);
  auto put =
      client_->PutFragment(nowhere, FragmentKey{"job-a", 0, 1, 0}, meta, data.data(), data.size());
  EXPECT_EQ(put.status().code(), absl::StatusCode::kUnavailable) << put.status();
  EXPECT_NE(put.status().message().find("2 attempts"), std::string::npos) << put.status();
  EXPECT_NE(put.status().message().find(nowhere), std::string::npos) << put.status();
  // Bad input is refused before anything is sent.
  EXPECT_EQ(
      client_
          ->PutFragment(address_, FragmentKey{"job-a", 0, 1, 0}, meta, data.data(), data.size() - 1)
          .status()
          .code(),
      absl::StatusCode::kInvalidArgument);
  FragmentMeta bad = meta;
  bad.ec_k = 0;
  EXPECT_EQ(
      client_->PutFragment(address_, FragmentKey{"job-a", 0, 1, 0}, bad, data.data(), data.size())
          .status()
          .code(),
      absl::StatusCode::kInvalidArgument);
}

TEST_F(PeerServiceTest, HeartbeatClientKeepsChannelsForAtMostMaxPeers) {
  GrpcPeerClient::Options o;
  o.channels_per_peer = 1;
  o.max_attempts = 1;
  o.control_timeout = absl::Milliseconds(500);
  o.max_peers_with_channels = 2;
  auto client = GrpcPeerClient::Create(o);
  ASSERT_TRUE(client.ok()) << client.status();
  HeartbeatMessage hb;
  hb.from = MemberInfo{"node-0", 1, "127.0.0.1:1"};
  // Probing members in turn: the live peer, two addresses where nothing listens, the peer again.
  for (const std::string& peer : {address_, std::string("127.0.0.1:1"),
                                  std::string("127.0.0.1:2"), address_}) {
    (void)(*client)->Heartbeat(peer, hb);
    EXPECT_LE((*client)->stats().peers_with_channels, 2u);
  }
  EXPECT_EQ((*client)->stats().channel_evictions, 2u);
  ASSERT_TRUE((*client)->Heartbeat(address_, hb).ok()) << "a closed peer's channel reopens";
  // reconnect_at_once: a peer that did not answer keeps no channel (none in reconnect backoff).
  o.reconnect_at_once = true;
  auto reconnecting = GrpcPeerClient::Create(o);
  ASSERT_TRUE(reconnecting.ok()) << reconnecting.status();
  EXPECT_EQ((*reconnecting)->Heartbeat("127.0.0.1:1", hb).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ((*reconnecting)->stats().peers_with_channels, 0u);
  ASSERT_TRUE((*reconnecting)->Heartbeat(address_, hb).ok());
  EXPECT_EQ((*reconnecting)->stats().peers_with_channels, 1u);
  o.max_peers_with_channels = -1;
  auto bad = GrpcPeerClient::Create(o);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("max_peers_with_channels"), std::string::npos);
}

TEST_F(PeerServiceTest, ConcurrentPutsFromManyThreads) {
  constexpr int kThreads = 4;
  const FragmentMeta meta = MetaFor(12 << 20);
  std::vector<std::vector<uint8_t>> data;
  for (int t = 0; t < kThreads; ++t) data.push_back(RandomBytes(meta.fragment_bytes));
  std::vector<absl::Status> results(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      results[t] = client_
                       ->PutFragment(address_, FragmentKey{"job-c", static_cast<uint32_t>(t), 5, 1},
                                     meta, data[t].data(), data[t].size())
                       .status();
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) {
    ASSERT_TRUE(results[t].ok()) << results[t];
    auto view = fragments_->Get(FragmentKey{"job-c", static_cast<uint32_t>(t), 5, 1});
    ASSERT_TRUE(view.ok());
    EXPECT_EQ(0, std::memcmp(view->data(), data[t].data(), data[t].size()));
  }
}

// ---------------------------------------------------------------------------------------------
// FakePeerClient

class FakePeerClientTest : public PeerServiceTest {
 protected:
  void SetUp() override {
    PeerServiceTest::SetUp();
    FakePeerClient::Peer peer;
    peer.fragments = fragments_.get();
    peer.shards = shard_source_.get();
    peer.self = MemberInfo{"node-1", 1001, "fake:1"};
    fake_.AddPeer("fake:1", peer);
  }
  FakePeerClient fake_{FakePeerClient::Options{absl::Milliseconds(300)}};
};

TEST_F(FakePeerClientTest, FailsDelaysDropsAndLosesRepliesOnCommand) {
  using Method = FakePeerClient::Method;
  using Kind = FakePeerClient::Fault::Kind;
  const FragmentKey key{"job-a", 0, 3, 1};
  const FragmentMeta meta = MetaFor(3 << 20);
  auto data = RandomBytes(meta.fragment_bytes);

  fake_.InjectFault("fake:1", Method::kPutFragment, {Kind::kFail});
  auto put = fake_.PutFragment("fake:1", key, meta, data.data(), data.size());
  EXPECT_EQ(put.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(fragments_->List("job-a").empty());  // not carried out

  fake_.InjectFault("", Method::kPutFragment, {Kind::kLoseReply});
  put = fake_.PutFragment("fake:1", key, meta, data.data(), data.size());
  EXPECT_EQ(put.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(fragments_->Get(key).ok());  // carried out; the reply was lost
  put = fake_.PutFragment("fake:1", key, meta, data.data(), data.size());  // the retry
  ASSERT_TRUE(put.ok()) << put.status();
  EXPECT_EQ(put->fragment_crc32c, Crc32c(data.data(), data.size()));

  std::vector<uint8_t> got(data.size());
  fake_.InjectFault("fake:1", Method::kAny,
                    {Kind::kDrop, absl::OkStatus(), absl::Milliseconds(50)});
  const absl::Time t0 = absl::Now();
  EXPECT_EQ(fake_.GetFragment("fake:1", key, 0, got.data(), got.size()).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_GE(absl::Now() - t0, absl::Milliseconds(50));

  fake_.InjectFault("fake:1", Method::kGetFragment,
                    {Kind::kDelay, absl::OkStatus(), absl::Milliseconds(80)});
  const absl::Time t1 = absl::Now();
  ASSERT_TRUE(fake_.GetFragment("fake:1", key, 0, got.data(), got.size()).ok());
  EXPECT_GE(absl::Now() - t1, absl::Milliseconds(80));
  EXPECT_TRUE(got == data);

  fake_.InjectFault("fake:1", Method::kListHeld,
                    {Kind::kFail, absl::ResourceExhaustedError("full"), absl::ZeroDuration(), 2});
  EXPECT_EQ(fake_.ListHeld("fake:1", "job-a").status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(fake_.ListHeld("fake:1", "job-a").status().code(),
            absl::StatusCode::kResourceExhausted);
  auto held = fake_.ListHeld("fake:1", "job-a");
  ASSERT_TRUE(held.ok());
  EXPECT_EQ(held->fragments.size(), 1u);

  EXPECT_EQ(fake_.calls("fake:1", Method::kPutFragment), 3);
  EXPECT_EQ(fake_.calls("", Method::kAny), 8);
  EXPECT_EQ(fake_.ListHeld("nobody:1", "").status().code(), absl::StatusCode::kUnavailable);
}

TEST_F(FakePeerClientTest, PausedPeerStallsCallsUntilResumed) {
  const FragmentKey key{"job-a", 0, 3, 1};
  const FragmentMeta meta = MetaFor(1 << 20);
  auto data = RandomBytes(meta.fragment_bytes);
  fake_.Pause("fake:1");
  // Past the paused-call timeout: kDeadlineExceeded, nothing stored.
  EXPECT_EQ(fake_.PutFragment("fake:1", key, meta, data.data(), data.size()).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(fragments_->List("").empty());
  absl::Notification done;
  absl::Status result;
  std::thread caller([&] {
    result = fake_.PutFragment("fake:1", key, meta, data.data(), data.size()).status();
    done.Notify();
  });
  EXPECT_FALSE(done.WaitForNotificationWithTimeout(absl::Milliseconds(100)));
  fake_.Resume("fake:1");
  caller.join();
  EXPECT_TRUE(result.ok()) << result;
  EXPECT_TRUE(fragments_->Get(key).ok());
}

TEST_F(FakePeerClientTest, FetchShardAndHeartbeatThroughTheFake) {
  const auto payload = SealSnapshot(/*rank=*/1, /*step=*/5, /*tensor_bytes=*/(2 << 20) + 7);
  VectorSink sink;
  auto info = fake_.FetchShard("fake:1", "job-a", 1, -1, &sink);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->step, 5);
  EXPECT_TRUE(sink.bytes == payload);
  HeartbeatMessage hb;
  hb.from = MemberInfo{"node-0", 1, "x:1"};
  auto reply = fake_.Heartbeat("fake:1", hb);
  ASSERT_TRUE(reply.ok());
  EXPECT_EQ(reply->peer.node_id, "node-1");
}

}  // namespace
}  // namespace tessera
