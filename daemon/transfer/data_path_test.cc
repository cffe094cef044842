// The raw TCP data path: a real DataPathServer over a real FragmentStore in /dev/shm, announced by
// a real PeerService over gRPC on 127.0.0.1, reached through the real GrpcPeerClient; and the
// wire protocol spoken by hand over a socket, to send what a correct client never would.
#include "daemon/transfer/data_path.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "common/crc32c.h"
#include "daemon/transfer/cluster_tls.h"
#include "daemon/transfer/data_path_crypto.h"
#include "daemon/transfer/peer_client.h"
#include "daemon/transfer/peer_service.h"
#include "daemon/transfer/test_certificates.h"
#include "ec/erasure_codec.h"
#include "gmock/gmock.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"
#include "proto/peer.pb.h"
#include "tests/relay.h"

namespace tessera {
namespace {

FragmentMeta MetaFor(uint64_t shard_bytes, uint64_t incarnation = 7) {
  FragmentMeta m;
  m.owner_incarnation = incarnation;
  m.ec_k = 3;
  m.ec_m = 2;
  m.shard_bytes = shard_bytes;
  m.fragment_bytes = ErasureCodec::FragmentBytes(shard_bytes, 3);
  m.shard_crc32c = 0x5EED;
  m.epoch = 0x1234567;  // travels with every write and read (checked by the meta comparisons)
  return m;
}

// The protocol by hand: frames and chunks over a blocking socket.
class RawConnection {
 public:
  explicit RawConnection(int port) {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
    timeval tv{10, 0};  // a test that waits in vain fails instead of hanging
    setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  }
  ~RawConnection() { close(fd_); }
  bool connected() const { return connected_; }

  void SendBytes(const void* data, size_t size) {
    ASSERT_EQ(send(fd_, data, size, MSG_NOSIGNAL), static_cast<ssize_t>(size));
  }
  void SendFrame(const google::protobuf::MessageLite& message) {
    const std::string bytes = message.SerializeAsString();
    SendLength(static_cast<uint32_t>(bytes.size()));
    SendBytes(bytes.data(), bytes.size());
  }
  void SendLength(uint32_t n) {
    uint8_t b[4] = {uint8_t(n), uint8_t(n >> 8), uint8_t(n >> 16), uint8_t(n >> 24)};
    SendBytes(b, 4);
  }
  void SendChunk(uint64_t offset, const uint8_t* data, uint32_t size, uint32_t crc) {
    uint8_t h[16];
    for (int i = 0; i < 8; ++i) h[i] = uint8_t(offset >> (8 * i));
    for (int i = 0; i < 4; ++i) h[8 + i] = uint8_t(size >> (8 * i));
    for (int i = 0; i < 4; ++i) h[12 + i] = uint8_t(crc >> (8 * i));
    SendBytes(h, sizeof(h));
    SendBytes(data, size);
  }
  // False when the server closed the connection (or nothing came in 10 s).
  bool Recv(void* dst, size_t size) {
    auto* p = static_cast<uint8_t*>(dst);
    while (size > 0) {
      const ssize_t n = recv(fd_, p, size, 0);
      if (n <= 0) return false;
      p += n;
      size -= static_cast<size_t>(n);
    }
    return true;
  }
  bool ReadResponse(peer::DataPathResponse* response) {
    uint8_t b[4];
    if (!Recv(b, 4)) return false;
    const uint32_t n = b[0] | (b[1] << 8) | (b[2] << 16) | (uint32_t(b[3]) << 24);
    std::string frame(n, '\0');
    if (n > 0 && !Recv(frame.data(), n)) return false;
    return response->ParseFromString(frame);
  }
  // True once the server has closed its end (reset, when it closed with our bytes unread);
  // false when it sends more or nothing happens within 10 s.
  bool ClosedByServer() {
    char c;
    const ssize_t n = recv(fd_, &c, 1, 0);
    return n == 0 || (n < 0 && errno == ECONNRESET);
  }

 private:
  int fd_ = -1;
  bool connected_ = false;
};

// Waits up to 10 s for the server's stats to satisfy `done`.
bool WaitFor(DataPathServer* server, const std::function<bool(const DataPathServer::Stats&)>& done) {
  for (int i = 0; i < 1000 && !done(server->stats()); ++i) absl::SleepFor(absl::Milliseconds(10));
  return done(server->stats());
}

// Serves `service` on a free loopback port: the server (null if it could not start) and, in
// *address, where it listens.
std::unique_ptr<grpc::Server> Serve(PeerService* service, std::string* address) {
  grpc::ServerBuilder builder;
  PeerService::ConfigureServerBuilder(&builder);
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(service);
  auto server = builder.BuildAndStart();
  *address = "127.0.0.1:" + std::to_string(port);
  return server;
}

class DataPathTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/dev/shm/tessera-data-path-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    root_ = tmpl;
    seed_ = std::random_device{}();
    rng_.seed(seed_);
    std::printf("seed=%llu\n", static_cast<unsigned long long>(seed_));
    budget_ = std::make_unique<CapacityBudget>(uint64_t{512} << 20);
    FragmentStore::Options fo;
    fo.directory = root_;
    fo.budget = budget_.get();
    auto fragments = FragmentStore::Open(fo);
    ASSERT_TRUE(fragments.ok()) << fragments.status();
    fragments_ = std::move(*fragments);
    StartServers(WriterFence());
    client_ = MakeClient(/*raw=*/true);
  }

  // A data path server on 127.0.0.1 over fragments_ (null, with a test failure, if it fails).
  std::unique_ptr<DataPathServer> StartDataServer(WriterFence fence, bool encrypt) {
    DataPathServer::Options so;
    so.host = "127.0.0.1";
    so.io_timeout = absl::Seconds(5);
    so.is_fenced = std::move(fence);
    so.encrypt = encrypt;
    auto server = DataPathServer::Start(fragments_.get(), so);
    EXPECT_TRUE(server.ok()) << server.status();
    return server.ok() ? std::move(*server) : nullptr;
  }

  // The data path server and the peer service over fragments_, with `fence` for writes.
  void StartServers(WriterFence fence) {
    if (grpc_server_) grpc_server_->Shutdown();
    if (data_server_) data_server_->Stop();
    data_server_ = StartDataServer(fence, /*encrypt=*/false);
    ASSERT_NE(data_server_, nullptr);
    ASSERT_GT(data_server_->port(), 0);
    ASSERT_EQ(data_server_->session_key().size(), 16u);

    PeerService::Options po;
    po.self = MemberInfo{"node-1", 1001, "127.0.0.1"};
    po.data_path_port = data_server_->port();
    po.data_path_session_key = [key = data_server_->session_key()](const std::string&) {
      return key;
    };
    po.is_fenced = fence;
    service_ = std::make_unique<PeerService>(fragments_.get(), nullptr, po);
    grpc_server_ = Serve(service_.get(), &address_);
    ASSERT_NE(grpc_server_, nullptr);
  }

  void TearDown() override {
    client_.reset();
    grpc_server_->Shutdown();
    data_server_->Stop();
    fragments_.reset();
    std::filesystem::remove_all(root_);
  }

  // With `credentials` (mutual TLS), the client takes only an encrypted raw data path.
  std::unique_ptr<GrpcPeerClient> MakeClient(
      bool raw, std::string self_node_id = "",
      std::shared_ptr<ClusterCredentials> credentials = nullptr) {
    GrpcPeerClient::Options co;
    co.self_node_id = std::move(self_node_id);
    co.encrypted_data_path_only = credentials != nullptr;
    co.credentials = std::move(credentials);
    co.channels_per_peer = 4;
    co.chunk_bytes = 1 << 20;
    co.min_range_bytes = 2 << 20;
    co.max_attempts = 3;
    co.initial_backoff = absl::Milliseconds(10);
    co.raw_data_path = raw;
    auto client = GrpcPeerClient::Create(co);
    EXPECT_TRUE(client.ok()) << client.status();
    return std::move(*client);
  }

  std::vector<uint8_t> RandomBytes(size_t n) {
    std::vector<uint8_t> v(n);
    for (size_t i = 0; i < n; i += 8) {
      const uint64_t x = rng_();
      std::memcpy(v.data() + i, &x, std::min<size_t>(8, n - i));
    }
    return v;
  }

  // A hand-made connection that has said hello with the right key.
  std::unique_ptr<RawConnection> Hello() {
    auto c = std::make_unique<RawConnection>(data_server_->port());
    EXPECT_TRUE(c->connected());
    peer::DataPathHello hello;
    hello.set_version(kDataPathVersionPlain);
    hello.set_session_key(data_server_->session_key());
    c->SendFrame(hello);
    peer::DataPathResponse answer;
    EXPECT_TRUE(c->ReadResponse(&answer));
    EXPECT_EQ(answer.code(), 0) << answer.message();
    return c;
  }

  static peer::DataPathRequest PutRequest(const FragmentKey& key, const FragmentMeta& meta,
                                          uint64_t offset, uint64_t length) {
    peer::DataPathRequest r;
    r.set_op(peer::DataPathRequest::PUT_RANGE);
    peer_wire::ToProto(key, meta.owner_incarnation, r.mutable_key());
    peer_wire::ToProto(meta, r.mutable_info());
    r.set_offset(offset);
    r.set_length(length);
    return r;
  }

  std::string root_;
  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
  std::unique_ptr<CapacityBudget> budget_;
  std::unique_ptr<FragmentStore> fragments_;
  std::unique_ptr<DataPathServer> data_server_;
  std::unique_ptr<PeerService> service_;
  std::unique_ptr<grpc::Server> grpc_server_;
  std::string address_;
  std::unique_ptr<GrpcPeerClient> client_;
};

TEST_F(DataPathTest, PutAndGetOverTheRawPathBitExactEachTwice) {
  // One range, four ranges over four connections, and a size that is no multiple of a chunk.
  uint64_t fragment_bytes_total = 0;
  for (uint64_t shard : {uint64_t{7000}, uint64_t{30} << 20, (uint64_t{13} << 20) + 4321}) {
    SCOPED_TRACE(shard);
    const FragmentKey key{"job-r", 1, static_cast<int64_t>(shard % 977), 3};
    const FragmentMeta meta = MetaFor(shard);
    const std::vector<uint8_t> data = RandomBytes(meta.fragment_bytes);
    const uint32_t crc = Crc32c(data.data(), data.size());
    fragment_bytes_total += data.size();
    for (int i = 0; i < 2; ++i) {
      auto put = client_->PutFragment(address_, key, meta, data.data(), data.size());
      ASSERT_TRUE(put.ok()) << put.status();
      EXPECT_EQ(put->state, SegmentState::kSealed);
      EXPECT_EQ(put->fragment_crc32c, crc);
    }
    auto view = fragments_->Get(key);
    ASSERT_TRUE(view.ok()) << view.status();
    ASSERT_EQ(view->size(), data.size());
    EXPECT_EQ(std::memcmp(view->data(), data.data(), data.size()), 0);
    for (int i = 0; i < 2; ++i) {
      std::vector<uint8_t> back(data.size() + 100, 0xA5);
      auto got = client_->GetFragment(address_, key, meta.owner_incarnation, back.data(),
                                      back.size());
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ(got->fragment_crc32c, crc);
      EXPECT_EQ(got->meta, meta);
      EXPECT_EQ(std::memcmp(back.data(), data.data(), data.size()), 0);
      EXPECT_EQ(back[data.size()], 0xA5) << "wrote past the fragment";
    }
  }
  const GrpcPeerClient::Stats stats = client_->stats();
  EXPECT_EQ(stats.raw_puts, 6u);
  EXPECT_EQ(stats.raw_gets, 6u);
  EXPECT_EQ(stats.grpc_puts + stats.grpc_gets, 0u);
  // The second put of each found it sealed: its bytes were read and dropped, not stored. (The
  // server counts a range sent once its last chunk is written, which may be just after the
  // client has read it.)
  EXPECT_TRUE(WaitFor(data_server_.get(), [&](const DataPathServer::Stats& s) {
    return s.bytes_sent == 2 * fragment_bytes_total;
  })) << data_server_->stats().bytes_sent << " of " << 2 * fragment_bytes_total << " bytes";
  const DataPathServer::Stats server = data_server_->stats();
  EXPECT_EQ(server.bytes_received, fragment_bytes_total);
  EXPECT_EQ(server.bytes_sent, 2 * fragment_bytes_total);
  EXPECT_EQ(server.connections_refused, 0u);
}

// A zombie (an older incarnation of a node that has been replaced) cannot write fragments over
// either path; the current incarnation can, and a writer that names no node is refused.
TEST_F(DataPathTest, FencedWritersAreRefusedOnBothPaths) {
  StartServers([](const std::string& node_id, uint64_t incarnation) {
    return node_id == "n2" && incarnation < 20;
  });
  const FragmentMeta base = MetaFor(uint64_t{3} << 20);
  const std::vector<uint8_t> data = RandomBytes(base.fragment_bytes);
  int step = 0;
  for (bool raw : {true, false}) {
    SCOPED_TRACE(raw ? "raw data path" : "gRPC streams");
    FragmentMeta zombie_meta = base;
    zombie_meta.owner_incarnation = 10;
    const FragmentKey zombie_key{"job-z", 0, ++step, 1};
    auto zombie = MakeClient(raw, "n2");
    auto refused = zombie->PutFragment(address_, zombie_key, zombie_meta, data.data(), data.size());
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
    EXPECT_NE(refused.status().message().find("incarnation 10"), std::string::npos)
        << refused.status();
    EXPECT_EQ(fragments_->Get(zombie_key).status().code(), absl::StatusCode::kNotFound);

    auto anonymous = MakeClient(raw, "");
    auto unnamed = anonymous->PutFragment(address_, zombie_key, base, data.data(), data.size());
    EXPECT_EQ(unnamed.status().code(), absl::StatusCode::kInvalidArgument) << unnamed.status();
    EXPECT_EQ(fragments_->Get(zombie_key).status().code(), absl::StatusCode::kNotFound);

    FragmentMeta current_meta = base;
    current_meta.owner_incarnation = 20;
    const FragmentKey key{"job-z", 0, ++step, 1};
    auto current = MakeClient(raw, "n2");
    auto put = current->PutFragment(address_, key, current_meta, data.data(), data.size());
    ASSERT_TRUE(put.ok()) << put.status();
    auto view = fragments_->Get(key);
    ASSERT_TRUE(view.ok()) << view.status();
    ASSERT_EQ(view->size(), data.size());
    EXPECT_EQ(std::memcmp(view->data(), data.data(), data.size()), 0);
  }
}

TEST_F(DataPathTest, OpenDataPathAnswersTheSameEachTwice) {
  auto channel = grpc::CreateChannel(address_, grpc::InsecureChannelCredentials());
  auto stub = peer::Peer::NewStub(channel);
  for (int i = 0; i < 2; ++i) {
    grpc::ClientContext context;
    peer::OpenDataPathRequest request;
    request.set_node_id("node-9");
    peer::OpenDataPathResponse response;
    ASSERT_TRUE(stub->OpenDataPath(&context, request, &response).ok());
    EXPECT_EQ(response.port(), data_server_->port());
    EXPECT_EQ(response.session_key(), data_server_->session_key());
    EXPECT_EQ(response.version(), kDataPathVersionPlain);
  }
}

TEST_F(DataPathTest, ClientWithTheRawPathOffUsesGrpcStreams) {
  auto grpc_client = MakeClient(/*raw=*/false);
  const FragmentKey key{"job-g", 0, 5, 0};
  const FragmentMeta meta = MetaFor(uint64_t{9} << 20);
  const std::vector<uint8_t> data = RandomBytes(meta.fragment_bytes);
  ASSERT_TRUE(grpc_client->PutFragment(address_, key, meta, data.data(), data.size()).ok());
  std::vector<uint8_t> back(data.size());
  ASSERT_TRUE(grpc_client->GetFragment(address_, key, 0, back.data(), back.size()).ok());
  EXPECT_EQ(back, data);
  EXPECT_EQ(grpc_client->stats().grpc_puts, 1u);
  EXPECT_EQ(grpc_client->stats().raw_puts, 0u);
  EXPECT_EQ(data_server_->stats().bytes_received, 0u);
}

TEST_F(DataPathTest, PeerWithoutADataPathGetsGrpcStreams) {
  // A second service over the same store whose OpenDataPath says no (peer.data_path = grpc).
  PeerService::Options po;
  po.self = MemberInfo{"node-2", 2002, "127.0.0.1"};
  PeerService plain(fragments_.get(), nullptr, po);
  std::string address;
  auto server = Serve(&plain, &address);
  ASSERT_NE(server, nullptr);
  const FragmentKey key{"job-p", 2, 9, 1};
  const FragmentMeta meta = MetaFor(uint64_t{3} << 20);
  const std::vector<uint8_t> data = RandomBytes(meta.fragment_bytes);
  ASSERT_TRUE(client_->PutFragment(address, key, meta, data.data(), data.size()).ok());
  std::vector<uint8_t> back(data.size());
  ASSERT_TRUE(client_->GetFragment(address, key, 0, back.data(), back.size()).ok());
  EXPECT_EQ(back, data);
  EXPECT_EQ(client_->stats().grpc_puts, 1u);
  EXPECT_EQ(client_->stats().grpc_gets, 1u);
  server->Shutdown();
}

// With a cluster token, every peer call needs it, and the data path's session key goes to
// token holders only.
TEST_F(DataPathTest, ClusterTokenGuardsEveryPeerCallAndTheDataPath) {
  PeerService::Options po;
  po.self = MemberInfo{"node-3", 3003, "127.0.0.1"};
  po.data_path_port = data_server_->port();
  po.data_path_session_key = [key = data_server_->session_key()](const std::string&) {
    return key;
  };
  po.token = "peer-token-0123456789";
  PeerService guarded(fragments_.get(), nullptr, po);
  std::string address;
  auto server = Serve(&guarded, &address);
  ASSERT_NE(server, nullptr);
  const FragmentKey key{"job-t", 0, 4, 1};
  const FragmentMeta meta = MetaFor(uint64_t{3} << 20);
  const std::vector<uint8_t> data = RandomBytes(meta.fragment_bytes);
  std::vector<uint8_t> back(data.size());
  const HeartbeatMessage beat{MemberInfo{"node-9", 9, "127.0.0.1:1"}, {}, 1};
  for (bool raw : {true, false}) {
    SCOPED_TRACE(raw ? "raw data path" : "gRPC streams");
    auto stranger = MakeClient(raw);
    EXPECT_EQ(stranger->Heartbeat(address, beat).status().code(),
              absl::StatusCode::kUnauthenticated);
    EXPECT_EQ(stranger->ListHeld(address, "").status().code(),
              absl::StatusCode::kUnauthenticated);
    auto put = stranger->PutFragment(address, key, meta, data.data(), data.size());
    EXPECT_EQ(put.status().code(), absl::StatusCode::kUnauthenticated) << put.status();
    EXPECT_NE(put.status().message().find("cluster token"), std::string::npos) << put.status();
    EXPECT_EQ(stranger->GetFragment(address, key, 0, back.data(), back.size()).status().code(),
              absl::StatusCode::kUnauthenticated);
  }
  EXPECT_TRUE(fragments_->List("job-t").empty()) << "a call without the token stored something";
  GrpcPeerClient::Options co;
  co.token = po.token;
  auto member = GrpcPeerClient::Create(co);
  ASSERT_TRUE(member.ok()) << member.status();
  ASSERT_TRUE((*member)->Heartbeat(address, beat).ok());
  auto put = (*member)->PutFragment(address, key, meta, data.data(), data.size());
  ASSERT_TRUE(put.ok()) << put.status();
  ASSERT_TRUE((*member)->GetFragment(address, key, 0, back.data(), back.size()).ok());
  EXPECT_EQ(back, data);
  EXPECT_EQ((*member)->stats().raw_puts, 1u);
  server->Shutdown();
}

TEST_F(DataPathTest, WrongKeyOrVersionIsRefusedAndClosed) {
  {
    RawConnection c(data_server_->port());
    ASSERT_TRUE(c.connected());
    peer::DataPathHello hello;
    hello.set_version(kDataPathVersionPlain);
    std::string key = data_server_->session_key();
    key[5] ^= 0x01;
    hello.set_session_key(key);
    c.SendFrame(hello);
    peer::DataPathResponse answer;
    ASSERT_TRUE(c.ReadResponse(&answer));
    EXPECT_EQ(answer.code(), static_cast<int>(absl::StatusCode::kPermissionDenied));
    EXPECT_NE(answer.message().find("session key"), std::string::npos) << answer.message();
    EXPECT_TRUE(c.ClosedByServer());
  }
  {
    RawConnection c(data_server_->port());
    peer::DataPathHello hello;
    hello.set_version(kDataPathVersionEncrypted + 1);
    hello.set_session_key(data_server_->session_key());
    c.SendFrame(hello);
    peer::DataPathResponse answer;
    ASSERT_TRUE(c.ReadResponse(&answer));
    EXPECT_EQ(answer.code(), static_cast<int>(absl::StatusCode::kFailedPrecondition));
    EXPECT_NE(answer.message().find("version"), std::string::npos) << answer.message();
    EXPECT_TRUE(c.ClosedByServer());
  }
  {
    RawConnection c(data_server_->port());
    c.SendLength(1 << 30);  // a frame far over the limit: closed without reading it
    peer::DataPathResponse answer;
    ASSERT_TRUE(c.ReadResponse(&answer));
    EXPECT_EQ(answer.code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
    EXPECT_TRUE(c.ClosedByServer());
  }
  EXPECT_EQ(data_server_->stats().connections_refused, 3u);
  // A client whose key is stale (the daemon restarted) gets kUnavailable, which it retries after
  // asking OpenDataPath again.
  DataPathClient stale(DataPathClient::Options{});
  DataPathClient::Endpoint endpoint{"127.0.0.1", data_server_->port(), "0123456789abcdef"};
  std::vector<uint8_t> buffer(4096);
  auto got = stale.GetRange("peer", endpoint, FragmentKey{"job", 0, 1, 0}, 0, 0, 0,
                            buffer.data(), buffer.size(), absl::Now() + absl::Seconds(5));
  EXPECT_EQ(got.status().code(), absl::StatusCode::kUnavailable) << got.status();
}

TEST_F(DataPathTest, ConnectionsBeyondTheLimitAreClosed) {
  DataPathServer::Options so;
  so.host = "127.0.0.1";
  so.max_connections = 2;
  auto small = DataPathServer::Start(fragments_.get(), so);
  ASSERT_TRUE(small.ok()) << small.status();
  RawConnection a((*small)->port()), b((*small)->port());
  ASSERT_TRUE(WaitFor(small->get(), [](const auto& s) { return s.connections_open == 2; }));
  RawConnection c((*small)->port());
  EXPECT_TRUE(c.ClosedByServer());
  EXPECT_EQ((*small)->stats().connections_refused, 1u);
  EXPECT_EQ((*small)->stats().connections_open, 2u);
  so.max_connections = 0;
  EXPECT_EQ(DataPathServer::Start(fragments_.get(), so).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(DataPathTest, IdleConnectionsAgeOutOnBothEnds) {
  DataPathServer::Options so;
  so.host = "127.0.0.1";
  so.idle_timeout = absl::Milliseconds(300);
  auto server = DataPathServer::Start(fragments_.get(), so);
  ASSERT_TRUE(server.ok()) << server.status();
  // The server closes a connection that sends no request for idle_timeout.
  {
    RawConnection c((*server)->port());
    peer::DataPathHello hello;
    hello.set_version(kDataPathVersionPlain);
    hello.set_session_key((*server)->session_key());
    c.SendFrame(hello);
    peer::DataPathResponse answer;
    ASSERT_TRUE(c.ReadResponse(&answer));
    EXPECT_EQ(answer.code(), 0);
    EXPECT_TRUE(c.ClosedByServer());
  }
  // The client reuses a pooled connection while it is young, and opens a new one after.
  DataPathClient::Options co;
  co.max_idle_age = absl::Milliseconds(100);
  DataPathClient client(co);
  const DataPathClient::Endpoint endpoint{"127.0.0.1", (*server)->port(), (*server)->session_key()};
  std::vector<uint8_t> buffer(4096);
  auto get = [&] {
    auto got = client.GetRange("peer", endpoint, FragmentKey{"job-none", 0, 1, 0}, 0, 0, 0,
                               buffer.data(), buffer.size(), absl::Now() + absl::Seconds(5));
    EXPECT_EQ(got.status().code(), absl::StatusCode::kNotFound) << got.status();
  };
  const uint64_t before = (*server)->stats().connections_accepted;
  get();
  get();
  EXPECT_EQ((*server)->stats().connections_accepted, before + 1);
  absl::SleepFor(absl::Milliseconds(150));
  get();
  EXPECT_EQ((*server)->stats().connections_accepted, before + 2);
}

TEST_F(DataPathTest, CorruptedChunkIsDataLossAndTheConnectionStaysInStep) {
  const FragmentKey key{"job-c", 4, 12, 2};
  const FragmentMeta meta = MetaFor(uint64_t{6} << 20);  // 2 MiB fragment
  const std::vector<uint8_t> data = RandomBytes(meta.fragment_bytes);
  const uint32_t half = static_cast<uint32_t>(meta.fragment_bytes / 2);
  auto c = Hello();
  // First half in one chunk, sent with the CRC of other bytes (as if damaged on the wire); the
  // second half intact, but a request that failed drops the rest of its bytes.
  c->SendFrame(PutRequest(key, meta, 0, meta.fragment_bytes));
  c->SendChunk(0, data.data(), half, Crc32c(data.data(), half) ^ 0x1);
  c->SendChunk(half, data.data() + half, static_cast<uint32_t>(meta.fragment_bytes - half),
               Crc32c(data.data() + half, meta.fragment_bytes - half));
  peer::DataPathResponse answer;
  ASSERT_TRUE(c->ReadResponse(&answer));
  EXPECT_EQ(answer.code(), static_cast<int>(absl::StatusCode::kDataLoss)) << answer.message();
  EXPECT_NE(answer.message().find("must be sent again"), std::string::npos) << answer.message();
  // The rest of the range was read (and dropped): the next request on the same connection works.
  peer::DataPathRequest seal;
  seal.set_op(peer::DataPathRequest::SEAL);
  peer_wire::ToProto(key, meta.owner_incarnation, seal.mutable_key());
  seal.set_fragment_crc32c(Crc32c(data.data(), data.size()));
  c->SendFrame(seal);
  ASSERT_TRUE(c->ReadResponse(&answer));
  EXPECT_EQ(answer.code(), static_cast<int>(absl::StatusCode::kFailedPrecondition))
      << answer.message();
  EXPECT_NE(answer.message().find("first missing: [0, "), std::string::npos) << answer.message();
  auto held = fragments_->List("job-c");
  ASSERT_EQ(held.size(), 1u);
  EXPECT_EQ(held[0].state, SegmentState::kWriting);
  EXPECT_EQ(held[0].bytes_received, 0u);
  // Sent again, right: it seals, bit-exact.
  c->SendFrame(PutRequest(key, meta, 0, meta.fragment_bytes));
  c->SendChunk(0, data.data(), half, Crc32c(data.data(), half));
  c->SendChunk(half, data.data() + half, static_cast<uint32_t>(meta.fragment_bytes - half),
               Crc32c(data.data() + half, meta.fragment_bytes - half));
  ASSERT_TRUE(c->ReadResponse(&answer));
  EXPECT_EQ(answer.code(), 0) << answer.message();
  EXPECT_EQ(answer.bytes_received(), meta.fragment_bytes);
  for (int i = 0; i < 2; ++i) {  // a repeated seal (a lost answer) is harmless
    c->SendFrame(seal);
    ASSERT_TRUE(c->ReadResponse(&answer));
    EXPECT_EQ(answer.code(), 0) << answer.message();
    EXPECT_TRUE(answer.sealed());
    EXPECT_EQ(answer.fragment().fragment_crc32c(), Crc32c(data.data(), data.size()));
  }
  auto view = fragments_->Get(key);
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_EQ(std::memcmp(view->data(), data.data(), data.size()), 0);
  EXPECT_GE(fragments_->stats().crc_failures, 1u);
  // A chunk for the now sealed fragment (a late retry) is read and ignored.
  c->SendFrame(PutRequest(key, meta, 0, half));
  const std::vector<uint8_t> other = RandomBytes(half);
  c->SendChunk(0, other.data(), half, Crc32c(other.data(), half));
  ASSERT_TRUE(c->ReadResponse(&answer));
  EXPECT_EQ(answer.code(), 0) << answer.message();
  EXPECT_TRUE(answer.sealed());
  view = fragments_->Get(key);
  ASSERT_TRUE(view.ok());
  EXPECT_EQ(std::memcmp(view->data(), data.data(), data.size()), 0);
}

TEST_F(DataPathTest, BadRequestsGetClearErrors) {
  const FragmentKey key{"job-b", 0, 3, 1};
  const FragmentMeta meta = MetaFor(uint64_t{3} << 20);
  peer::DataPathResponse answer;
  {
    // A range past the fragment: refused and closed (its bytes cannot be trusted to follow).
    auto c = Hello();
    c->SendFrame(PutRequest(key, meta, meta.fragment_bytes - 10, 20));
    ASSERT_TRUE(c->ReadResponse(&answer));
    EXPECT_EQ(answer.code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
    EXPECT_NE(answer.message().find("within info.fragment_bytes"), std::string::npos)
        << answer.message();
    EXPECT_TRUE(c->ClosedByServer());
  }
  {
    // A chunk that is not where the range says: refused and closed.
    auto c = Hello();
    const std::vector<uint8_t> data = RandomBytes(4096);
    c->SendFrame(PutRequest(key, meta, 0, 8192));
    c->SendChunk(4096, data.data(), 4096, Crc32c(data.data(), 4096));
    ASSERT_TRUE(c->ReadResponse(&answer));
    EXPECT_EQ(answer.code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
    EXPECT_NE(answer.message().find("at offset 0 was expected"), std::string::npos)
        << answer.message();
    EXPECT_TRUE(c->ClosedByServer());
  }
  {
    // Bad metadata (k of 0) and a fragment nobody holds: errors, and the connection goes on.
    auto c = Hello();
    FragmentMeta bad = meta;
    bad.ec_k = 0;
    const std::vector<uint8_t> data = RandomBytes(4096);
    c->SendFrame(PutRequest(key, bad, 0, 4096));
    c->SendChunk(0, data.data(), 4096, Crc32c(data.data(), 4096));
    ASSERT_TRUE(c->ReadResponse(&answer));
    EXPECT_EQ(answer.code(), static_cast<int>(absl::StatusCode::kInvalidArgument))
        << answer.message();
    peer::DataPathRequest get;
    get.set_op(peer::DataPathRequest::GET_RANGE);
    peer_wire::ToProto(FragmentKey{"job-none", 0, 1, 0}, 0, get.mutable_key());
    c->SendFrame(get);
    ASSERT_TRUE(c->ReadResponse(&answer));
    EXPECT_EQ(answer.code(), static_cast<int>(absl::StatusCode::kNotFound)) << answer.message();
    get.set_chunk_bytes(100);  // below 64 KiB
    c->SendFrame(get);
    ASSERT_TRUE(c->ReadResponse(&answer));
    EXPECT_EQ(answer.code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
    EXPECT_NE(answer.message().find("chunk_bytes"), std::string::npos) << answer.message();
    peer::DataPathRequest unknown;
    unknown.set_op(static_cast<peer::DataPathRequest::Op>(9));
    c->SendFrame(unknown);
    ASSERT_TRUE(c->ReadResponse(&answer));
    EXPECT_EQ(answer.code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
    EXPECT_NE(answer.message().find("PUT_RANGE (1), SEAL (2) or GET_RANGE (3)"),
              std::string::npos)
        << answer.message();
  }
  EXPECT_GE(data_server_->stats().request_errors, 6u);
}

TEST_F(DataPathTest, StalledSenderTimesOutAndStopClosesConnections) {
  const FragmentKey key{"job-s", 0, 1, 0};
  const FragmentMeta meta = MetaFor(uint64_t{3} << 20);
  auto c = Hello();
  const std::vector<uint8_t> data = RandomBytes(1000);
  c->SendFrame(PutRequest(key, meta, 0, meta.fragment_bytes));
  c->SendChunk(0, data.data(), 1000, Crc32c(data.data(), 1000));
  // ... and nothing more: after io_timeout (5 s) the server gives up on the request.
  EXPECT_TRUE(c->ClosedByServer());
  auto held = fragments_->List("job-s");
  ASSERT_EQ(held.size(), 1u);
  EXPECT_EQ(held[0].bytes_received, 1000u);
  // Idle connections end when the server stops.
  auto idle = Hello();
  EXPECT_EQ(data_server_->stats().connections_open, 1u);
  data_server_->Stop();
  EXPECT_TRUE(idle->ClosedByServer());
  EXPECT_EQ(data_server_->stats().connections_open, 0u);
}

TEST_F(DataPathTest, ConcurrentPutsFromManyThreads) {
  std::vector<std::vector<uint8_t>> datas;
  const FragmentMeta meta = MetaFor(uint64_t{12} << 20);
  for (int i = 0; i < 8; ++i) datas.push_back(RandomBytes(meta.fragment_bytes));
  std::vector<std::thread> threads;
  std::vector<absl::Status> statuses(datas.size());
  for (size_t i = 0; i < datas.size(); ++i) {
    threads.emplace_back([&, i] {
      const FragmentKey key{"job-m", static_cast<uint32_t>(i), 1, 0};
      statuses[i] =
          client_->PutFragment(address_, key, meta, datas[i].data(), datas[i].size()).status();
    });
  }
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < datas.size(); ++i) {
    ASSERT_TRUE(statuses[i].ok()) << statuses[i];
    auto view = fragments_->Get(FragmentKey{"job-m", static_cast<uint32_t>(i), 1, 0});
    ASSERT_TRUE(view.ok()) << view.status();
    EXPECT_EQ(std::memcmp(view->data(), datas[i].data(), datas[i].size()), 0) << i;
  }
}

TEST_F(DataPathTest, PrepareOpensConnectionsAheadAndAgainForANewIncarnation) {
  client_->Prepare(address_, 1, /*open_connections=*/true);
  ASSERT_TRUE(WaitFor(data_server_.get(), [](const auto& s) { return s.connections_open == 4; }))
      << data_server_->stats().connections_open;
  // A fragment cut in 4 ranges uses the prepared connections: none is opened for it.
  const FragmentKey key{"job-w", 0, 2, 0};
  const FragmentMeta meta = MetaFor(uint64_t{30} << 20);
  const std::vector<uint8_t> data = RandomBytes(meta.fragment_bytes);
  ASSERT_TRUE(client_->PutFragment(address_, key, meta, data.data(), data.size()).ok());
  client_->Prepare(address_, 1, /*open_connections=*/true);  // the same incarnation: nothing to do
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_EQ(data_server_->stats().connections_accepted, 4u);
  // The peer restarted: the old connections are closed and new ones opened.
  client_->Prepare(address_, 2, /*open_connections=*/true);
  ASSERT_TRUE(WaitFor(data_server_.get(), [](const auto& s) {
    return s.connections_accepted == 8 && s.connections_open == 4;
  })) << data_server_->stats().connections_accepted << " accepted, "
      << data_server_->stats().connections_open << " open";
  auto view = fragments_->Get(key);
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_EQ(std::memcmp(view->data(), data.data(), data.size()), 0);
}

// ---------------------------------------------------------------------------------------------
// Version 2: mutual TLS on the peer port, and the raw data path encrypted.

// The version 2 protocol by hand, with the record codec: to send what a correct client never
// would (another node's writes, a replay).
class SealedConnection {
 public:
  // Says hello as `node_id` holding `session_key`; `ok` says whether the key check passed.
  SealedConnection(int port, const std::string& node_id, const std::string& session_key)
      : raw_(port) {
    peer::DataPathHello hello;
    hello.set_version(kDataPathVersionEncrypted);
    hello.set_node_id(node_id);
    const std::string client_nonce(kDataPathNonceBytes, 'c');
    hello.set_client_nonce(client_nonce);
    raw_.SendFrame(hello);
    peer::DataPathResponse answer;
    if (!raw_.ReadResponse(&answer) || answer.code() != 0) return;
    const ConnectionKeys keys =
        DeriveConnectionKeys(session_key, node_id, client_nonce, answer.server_nonce());
    sealer_ = std::make_unique<RecordSealer>(keys.client_to_server, "to the server");
    opener_ = std::make_unique<RecordOpener>(keys.server_to_client, "from the server");
    peer::DataPathHello proof;
    proof.set_version(kDataPathVersionEncrypted);
    proof.set_node_id(node_id);
    SendFrame(proof);
    if (!raw_.ReadResponse(&answer)) return;
    check_code_ = answer.code();
    check_message_ = answer.message();
  }
  int check_code() const { return check_code_; }
  const std::string& check_message() const { return check_message_; }
  RawConnection& raw() { return raw_; }

  void SendSealed(const std::string& bytes) {
    auto record = sealer_->Seal(bytes);
    ASSERT_TRUE(record.ok()) << record.status();
    raw_.SendBytes(record->data(), record->size());
  }
  void SendFrame(const google::protobuf::MessageLite& message) {
    const std::string body = message.SerializeAsString();
    const uint32_t n = static_cast<uint32_t>(body.size());
    SendSealed(std::string({char(n), char(n >> 8), char(n >> 16), char(n >> 24)}));
    SendSealed(body);
  }
  void SendChunk(uint64_t offset, const std::string& data) {
    std::string h(16, '\0');
    const uint32_t crc = Crc32c(reinterpret_cast<const uint8_t*>(data.data()), data.size());
    const uint32_t size = static_cast<uint32_t>(data.size());
    for (int i = 0; i < 8; ++i) h[i] = char(offset >> (8 * i));
    for (int i = 0; i < 4; ++i) h[8 + i] = char(size >> (8 * i));
    for (int i = 0; i < 4; ++i) h[12 + i] = char(crc >> (8 * i));
    SendSealed(h);
    SendSealed(data);
  }
  // The next response, opened; false when the server closed instead.
  bool ReadResponse(peer::DataPathResponse* response) {
    std::string length, body;
    if (!ReadRecord(&length) || length.size() != 4) return false;
    return ReadRecord(&body) && response->ParseFromString(body);
  }

 private:
  bool ReadRecord(std::string* out) {
    uint8_t header[kRecordHeaderBytes];
    if (!raw_.Recv(header, sizeof(header))) return false;
    const uint32_t n =
        header[0] | (header[1] << 8) | (header[2] << 16) | (uint32_t(header[3]) << 24);
    std::string record(reinterpret_cast<const char*>(header), sizeof(header));
    record.resize(sizeof(header) + n + kRecordTagBytes);
    if (!raw_.Recv(record.data() + sizeof(header), n + kRecordTagBytes)) return false;
    auto opened = opener_->Open(record);
    if (!opened.ok()) return false;
    *out = *opened;
    return true;
  }

  RawConnection raw_;
  std::unique_ptr<RecordSealer> sealer_;
  std::unique_ptr<RecordOpener> opener_;
  int check_code_ = -1;
  std::string check_message_;
};

class DataPathTlsTest : public DataPathTest {
 protected:
  void SetUp() override {
    DataPathTest::SetUp();
    auto ca = TestCa::Create(root_);
    ASSERT_TRUE(ca.ok()) << ca.status();
    ca_ = std::move(*ca);
    auto server_files = ca_->IssueNode("n0");
    ASSERT_TRUE(server_files.ok()) << server_files.status();
    tls_data_ = StartDataServer(WriterFence(), /*encrypt=*/true);
    ASSERT_NE(tls_data_, nullptr);
    ASSERT_EQ(tls_data_->version(), kDataPathVersionEncrypted);
    PeerService::Options po;
    po.self = MemberInfo{"n0", 1000, "127.0.0.1"};
    po.data_path_port = tls_data_->port();
    po.data_path_version = tls_data_->version();
    po.data_path_session_key = [server = tls_data_.get()](const std::string& node_id) {
      return server->SessionKeyFor(node_id);
    };
    tls_service_ = std::make_unique<PeerService>(fragments_.get(), nullptr, po);
    grpc::ServerBuilder builder;
    PeerService::ConfigureServerBuilder(&builder);
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", PeerServerCredentials(*server_files), &port);
    builder.RegisterService(tls_service_.get());
    tls_grpc_ = builder.BuildAndStart();
    ASSERT_NE(tls_grpc_, nullptr);
    tls_address_ = "127.0.0.1:" + std::to_string(port);
  }
  void TearDown() override {
    tls_grpc_->Shutdown();
    tls_data_->Stop();
    DataPathTest::TearDown();
  }

  // A daemon's client with a certificate naming `cert_node`, speaking as `self_node_id`.
  std::unique_ptr<GrpcPeerClient> TlsClient(const std::vector<std::string>& cert_nodes,
                                            const std::string& self_node_id, bool raw = true) {
    auto files = ca_->Issue(absl::StrCat("client-", ++clients_), cert_nodes);
    EXPECT_TRUE(files.ok()) << files.status();
    return MakeClient(raw, self_node_id, ClusterCredentials::Tls(*files));
  }

  // A data path client of node `node_id` for the version 2 server, reached through `port`.
  DataPathClient::Endpoint EndpointFor(const std::string& node_id, uint16_t port) {
    return DataPathClient::Endpoint{"127.0.0.1", port, tls_data_->SessionKeyFor(node_id),
                                    kDataPathVersionEncrypted};
  }
  // A range of 256 KiB or more is sealed and opened on the cipher pool's threads
  // (data_path_wire.cc), in records of 256 KiB: a chunk of 256 KiB is one record, a chunk of
  // 1 MiB four.
  static DataPathClient::Options ClientOf(const std::string& node_id,
                                          size_t chunk_bytes = 256 << 10) {
    DataPathClient::Options o;
    o.self_node_id = node_id;
    o.chunk_bytes = chunk_bytes;
    return o;
  }

  std::unique_ptr<TestCa> ca_;
  int clients_ = 0;
  std::unique_ptr<DataPathServer> tls_data_;
  std::unique_ptr<PeerService> tls_service_;
  std::unique_ptr<grpc::Server> tls_grpc_;
  std::string tls_address_;
};

// A daemon with its own certificate puts and gets over the encrypted raw path, bit-exact; one
// whose certificate names another node is refused on every call that names a sender; one
// naming no node (an operator's) reaches no peer call.
TEST_F(DataPathTlsTest, EncryptedRawPathForTheCertifiedNodeOnly) {
  const FragmentMeta meta = MetaFor(uint64_t{21} << 20);
  const std::vector<uint8_t> data = RandomBytes(meta.fragment_bytes);
  const FragmentKey key{"job-tls", 0, 1, 0};
  auto n1 = TlsClient({"n1"}, "n1");
  for (int i = 0; i < 2; ++i) {
    auto put = n1->PutFragment(tls_address_, key, meta, data.data(), data.size());
    ASSERT_TRUE(put.ok()) << put.status();
    EXPECT_EQ(put->fragment_crc32c, Crc32c(data.data(), data.size()));
    std::vector<uint8_t> back(data.size());
    auto got = n1->GetFragment(tls_address_, key, 0, back.data(), back.size());
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(back, data);
  }
  EXPECT_EQ(n1->stats().raw_puts, 2u);
  EXPECT_EQ(n1->stats().raw_gets, 2u);
  EXPECT_EQ(n1->stats().grpc_puts + n1->stats().grpc_gets, 0u);
  EXPECT_EQ(tls_data_->stats().bytes_received, data.size());
  EXPECT_EQ(tls_data_->stats().records_refused, 0u);
  EXPECT_TRUE(n1->Heartbeat(tls_address_, HeartbeatMessage{MemberInfo{"n1", 11, "x:1"}, {}, 1})
                  .ok());

  // n9's certificate, claiming n1: refused, naming both, on every path.
  const FragmentKey other{"job-tls", 1, 1, 0};
  for (bool raw : {true, false}) {
    SCOPED_TRACE(raw ? "raw data path" : "gRPC streams");
    auto impostor = TlsClient({"n9"}, "n1", raw);
    auto put = impostor->PutFragment(tls_address_, other, meta, data.data(), data.size());
    EXPECT_EQ(put.status().code(), absl::StatusCode::kPermissionDenied) << put.status();
    EXPECT_THAT(std::string(put.status().message()),
                ::testing::HasSubstr(raw ? "OpenDataPath node_id claims node 'n1', but the caller "
                                           "presented a certificate (CN=client-"
                                         : "PutFragment owner_node_id claims node 'n1'"));
    EXPECT_THAT(std::string(put.status().message()), ::testing::HasSubstr("of node 'n9'"));
    auto beat =
        impostor->Heartbeat(tls_address_, HeartbeatMessage{MemberInfo{"n1", 99, "x:1"}, {}, 1});
    EXPECT_EQ(beat.status().code(), absl::StatusCode::kPermissionDenied) << beat.status();
    EXPECT_THAT(std::string(beat.status().message()),
                ::testing::HasSubstr("Heartbeat node_id claims node 'n1'"));
  }
  EXPECT_EQ(fragments_->Get(other).status().code(), absl::StatusCode::kNotFound);
  // An operator's certificate (no node) reaches no peer call, not even a read.
  auto operator_client = TlsClient({}, "");
  std::vector<uint8_t> back(data.size());
  auto read = operator_client->GetFragment(tls_address_, key, 0, back.data(), back.size());
  EXPECT_EQ(read.status().code(), absl::StatusCode::kPermissionDenied) << read.status();
  EXPECT_THAT(std::string(read.status().message()), ::testing::HasSubstr("are for daemons"));
}

// The sending side checks whom it reached: a fragment for node n5, sent where n0 answers (another
// node's valid certificate at n5's address), never reaches n0, over either path: the handshake of
// the gRPC channel (which would carry OpenDataPath, or the fragment's streams) is refused, so
// neither a data path connection nor a byte gets there; the refusal is counted. Sent to n0 as
// n0, it goes as before. A daemon that requires node ids refuses a target without one.
TEST_F(DataPathTlsTest, AFragmentGoesOnlyToTheNodeItIsFor) {
  const FragmentMeta meta = MetaFor(uint64_t{6} << 20);
  const std::vector<uint8_t> data = RandomBytes(meta.fragment_bytes);
  auto files = ca_->IssueNode("n1");
  ASSERT_TRUE(files.ok()) << files.status();
  std::shared_ptr<ClusterCredentials> credentials = ClusterCredentials::Tls(*files);
  const DataPathServer::Stats before = tls_data_->stats();
  const FragmentKey key{"job-whom", 0, 3, 1};
  for (bool raw : {true, false}) {
    SCOPED_TRACE(raw ? "raw data path" : "gRPC streams");
    auto n1 = MakeClient(raw, "n1", credentials);
    auto put = n1->PutFragment(PeerTarget(tls_address_, "n5"), key, meta, data.data(), data.size());
    EXPECT_EQ(put.status().code(), absl::StatusCode::kUnavailable) << put.status();
    std::vector<uint8_t> back(data.size());
    auto got = n1->GetFragment(PeerTarget(tls_address_, "n5"), key, 0, back.data(), back.size());
    EXPECT_EQ(got.status().code(), absl::StatusCode::kUnavailable) << got.status();
  }
  EXPECT_EQ(fragments_->Get(key).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(tls_data_->stats().connections_accepted, before.connections_accepted);
  EXPECT_EQ(tls_data_->stats().bytes_received, before.bytes_received);
  EXPECT_GE(credentials->stats().servers_refused, 2u);

  auto n1 = MakeClient(true, "n1", credentials);
  auto put = n1->PutFragment(PeerTarget(tls_address_, "n0"), key, meta, data.data(), data.size());
  ASSERT_TRUE(put.ok()) << put.status();
  EXPECT_EQ(n1->stats().raw_puts, 1u);
  EXPECT_EQ(tls_data_->stats().bytes_received, before.bytes_received + data.size());

  GrpcPeerClient::Options strict;
  strict.credentials = credentials;
  strict.self_node_id = "n1";
  strict.require_node_id = true;
  auto client = GrpcPeerClient::Create(strict);
  ASSERT_TRUE(client.ok()) << client.status();
  EXPECT_EQ(
      (*client)->PutFragment(tls_address_, key, meta, data.data(), data.size()).status().code(),
      absl::StatusCode::kInvalidArgument);
}

// What a man in the middle sees of the version 2 path: not one 32-byte run of the fragment, nor
// of the frames' field values; the same transfer over version 1 shows the fragment as is (so
// the capture would have found it).
TEST_F(DataPathTlsTest, TheWireCarriesNoPlaintext) {
  const FragmentMeta meta = MetaFor(uint64_t{3} << 20);
  const std::vector<uint8_t> data = RandomBytes(meta.fragment_bytes);
  const std::string job = "job-wire-secret-name";
  auto contains_plaintext = [&](const std::string& wire) {
    for (size_t i = 0; i + 32 <= data.size(); i += 4096) {
      if (wire.find(std::string(reinterpret_cast<const char*>(data.data()) + i, 32)) !=
          std::string::npos) {
        return true;
      }
    }
    return false;
  };
  for (int variant = 0; variant < 3; ++variant) {
    const bool encrypted = variant > 0;
    const size_t chunk = variant == 2 ? size_t{1} << 20 : size_t{256} << 10;
    SCOPED_TRACE(encrypted ? absl::StrCat("version 2, chunks of ", chunk) : "version 1");
    DataPathServer* server = encrypted ? tls_data_.get() : data_server_.get();
    tessera::testing::TcpRelay proxy(server->port());
    DataPathClient client(ClientOf("n1", chunk));
    const DataPathClient::Endpoint endpoint =
        encrypted ? EndpointFor("n1", proxy.port())
                  : DataPathClient::Endpoint{"127.0.0.1", proxy.port(), server->session_key(),
                                             kDataPathVersionPlain};
    const FragmentKey key{job, static_cast<uint32_t>(variant), 7, 2};
    uint32_t crc = 0;
    const absl::Time deadline = absl::Now() + absl::Seconds(20);
    auto put =
        client.PutRange("n0", endpoint, key, meta, data.data(), 0, data.size(), deadline, &crc);
    ASSERT_TRUE(put.ok()) << put.status();
    ASSERT_TRUE(client.Seal("n0", endpoint, key, meta, crc, deadline).ok());
    std::vector<uint8_t> back(data.size());
    auto got = client.GetRange("n0", endpoint, key, 0, 0, 0, back.data(), back.size(), deadline);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(back, data);
    const std::string to_server = proxy.Captured(true);
    const std::string to_client = proxy.Captured(false);
    EXPECT_GE(to_server.size(), data.size());
    EXPECT_GE(to_client.size(), data.size());
    EXPECT_EQ(contains_plaintext(to_server), !encrypted);
    EXPECT_EQ(contains_plaintext(to_client), !encrypted);
    EXPECT_EQ(to_server.find(job) != std::string::npos, !encrypted);  // in every request
    if (encrypted) {
      EXPECT_EQ(to_server.find(server->SessionKeyFor("n1")), std::string::npos)
          << "the session key went over the wire";
    }
  }
}

// A byte altered on the way, either way, ends the connection with a clear error, and nothing it
// carried is taken: the fragment stays unsealed, a read returns no bytes.
TEST_F(DataPathTlsTest, AlteredBytesAreRefusedEitherWay) {
  const FragmentMeta meta = MetaFor(uint64_t{3} << 20);
  const std::vector<uint8_t> data = RandomBytes(meta.fragment_bytes);
  const absl::Time deadline = absl::Now() + absl::Seconds(40);
  for (size_t chunk : {size_t{256} << 10, size_t{1} << 20}) {
    SCOPED_TRACE(absl::StrCat("chunks of ", chunk, " bytes"));
    const std::string job = absl::StrCat("job-alter-", chunk);
    const uint64_t refused_before = tls_data_->stats().records_refused;
    {
      // Client to server, inside the fragment's bytes (well past the handshake).
      tessera::testing::TcpRelay proxy(tls_data_->port());
      proxy.AlterByte(/*client_to_server=*/true, 200000, 0x10);
      DataPathClient client(ClientOf("n1", chunk));
      const FragmentKey key{job, 0, 1, 0};
      uint32_t crc = 0;
      auto put = client.PutRange("n0", EndpointFor("n1", proxy.port()), key, meta, data.data(), 0,
                                 data.size(), deadline, &crc);
      EXPECT_FALSE(put.ok());
      ASSERT_TRUE(WaitFor(tls_data_.get(),
                          [&](const auto& s) { return s.records_refused == refused_before + 1; }));
      auto held = fragments_->List(job);
      ASSERT_EQ(held.size(), 1u);
      EXPECT_EQ(held[0].state, SegmentState::kWriting);
      EXPECT_LT(held[0].bytes_received, data.size());
    }
    {
      // Server to client, inside a read's bytes: the reader refuses them.
      const FragmentKey key{job, 1, 1, 0};
      auto n1 = TlsClient({"n1"}, "n1");
      ASSERT_TRUE(n1->PutFragment(tls_address_, key, meta, data.data(), data.size()).ok());
      tessera::testing::TcpRelay proxy(tls_data_->port());
      proxy.AlterByte(/*client_to_server=*/false, 300000, 0x01);
      DataPathClient client(ClientOf("n1", chunk));
      std::vector<uint8_t> back(data.size());
      auto got = client.GetRange("n0", EndpointFor("n1", proxy.port()), key, 0, 0, 0, back.data(),
                                 back.size(), deadline);
      EXPECT_EQ(got.status().code(), absl::StatusCode::kDataLoss) << got.status();
      EXPECT_THAT(
          std::string(got.status().message()),
          ::testing::HasSubstr("does not authenticate: it was altered, replayed, reordered"));
    }
  }
}

// A fragment of several chunks: each chunk is read while the records of the one before are
// still being opened on the cipher pool (Io::RecvStart), both ways, bit-exact, whole and from
// odd offsets. A byte altered in the last record of a middle chunk (opened on the pool and
// checked only once the next chunk has been read) ends the connection, and neither that chunk
// nor any after it counts as received; a read returns no bytes.
TEST_F(DataPathTlsTest, ChunksReadWhileTheOneBeforeIsOpenedStayExactAndAlteredOnesCountNothing) {
  const uint64_t fragment_bytes = (uint64_t{12} << 20) + 4096;  // sealed chunks: 4+4+4 MiB+4 KiB
  const FragmentMeta meta = MetaFor(3 * fragment_bytes);
  ASSERT_EQ(meta.fragment_bytes, fragment_bytes);
  const std::vector<uint8_t> data = RandomBytes(meta.fragment_bytes);
  const uint32_t whole = Crc32c(data.data(), data.size());
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  DataPathClient client(ClientOf("n1", size_t{1} << 20));
  const DataPathClient::Endpoint endpoint = EndpointFor("n1", tls_data_->port());
  const FragmentKey key{"job-pipeline", 0, 1, 0};
  uint32_t crc = 0;
  auto put =
      client.PutRange("n0", endpoint, key, meta, data.data(), 0, data.size(), deadline, &crc);
  ASSERT_TRUE(put.ok()) << put.status();
  EXPECT_EQ(put->bytes_received, data.size());
  EXPECT_EQ(crc, whole);
  auto sealed = client.Seal("n0", endpoint, key, meta, whole, deadline);
  ASSERT_TRUE(sealed.ok()) << sealed.status();
  std::vector<uint8_t> back(data.size());
  auto got = client.GetRange("n0", endpoint, key, 0, 0, 0, back.data(), back.size(), deadline);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->range_crc32c, whole);
  EXPECT_EQ(back, data);
  const uint64_t begin = 12345;
  const uint64_t end = data.size() - 777;
  std::vector<uint8_t> part(data.size());
  auto middle =
      client.GetRange("n0", endpoint, key, 0, begin, end, part.data(), part.size(), deadline);
  ASSERT_TRUE(middle.ok()) << middle.status();
  EXPECT_EQ(middle->range_crc32c, Crc32c(data.data() + begin, end - begin));
  EXPECT_TRUE(std::equal(data.begin() + begin, data.begin() + end, part.begin() + begin));
  EXPECT_EQ(tls_data_->stats().records_refused, 0u);

  // On the wire a sealed chunk is its header's record (4 + 16 + 16 bytes) and 16 records of
  // 256 KiB (4 + 262144 + 16 bytes each); the hello and request frames come first. The byte
  // altered is 100000 bytes into the second chunk's last record.
  constexpr uint64_t kRecord = 4 + (256 << 10) + 16;
  constexpr uint64_t kChunkOnWire = 36 + 16 * kRecord;
  constexpr uint64_t kTarget = kChunkOnWire + 36 + 15 * kRecord + 100000;
  {
    const uint64_t refused_before = tls_data_->stats().records_refused;
    tessera::testing::TcpRelay proxy(tls_data_->port());
    proxy.AlterByte(/*client_to_server=*/true, kTarget, 0x04);
    DataPathClient altered(ClientOf("n1", size_t{1} << 20));
    const FragmentKey other{"job-pipeline", 1, 1, 0};
    auto refused = altered.PutRange("n0", EndpointFor("n1", proxy.port()), other, meta, data.data(),
                                    0, data.size(), deadline, &crc);
    EXPECT_FALSE(refused.ok());
    ASSERT_TRUE(WaitFor(tls_data_.get(),
                        [&](const auto& s) { return s.records_refused == refused_before + 1; }));
    auto held = fragments_->List("job-pipeline");
    ASSERT_EQ(held.size(), 2u);
    EXPECT_EQ(held[1].key.rank, 1u);
    EXPECT_EQ(held[1].state, SegmentState::kWriting);
    EXPECT_LE(held[1].bytes_received, uint64_t{4} << 20) << "the first chunk at most";
  }
  {
    tessera::testing::TcpRelay proxy(tls_data_->port());
    proxy.AlterByte(/*client_to_server=*/false, kTarget, 0x04);
    DataPathClient altered(ClientOf("n1", size_t{1} << 20));
    auto refused = altered.GetRange("n0", EndpointFor("n1", proxy.port()), key, 0, 0, 0,
                                    back.data(), back.size(), deadline);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kDataLoss) << refused.status();
    EXPECT_THAT(std::string(refused.status().message()),
                ::testing::HasSubstr("does not authenticate: it was altered, replayed, reordered"));
  }
}

// A sender that stalls after a chunk whose one record the pool opens: the server finishes that
// chunk while it waits for the next, so it counts once the server has given up on the request.
TEST_F(DataPathTlsTest, AStalledSendersLastChunkCountsWhenTheServerGivesUp) {
  SealedConnection c(tls_data_->port(), "n1", tls_data_->SessionKeyFor("n1"));
  ASSERT_EQ(c.check_code(), 0) << c.check_message();
  const FragmentMeta meta = MetaFor(uint64_t{3} << 20);
  const FragmentKey key{"job-stalled", 0, 1, 0};
  peer::DataPathRequest put = PutRequest(key, meta, 0, meta.fragment_bytes);
  put.mutable_key()->set_owner_node_id("n1");
  c.SendFrame(put);
  const std::vector<uint8_t> bytes = RandomBytes(300 << 10);
  c.SendChunk(0, std::string(bytes.begin(), bytes.end()));
  // ... and nothing more: after io_timeout (5 s) the server gives up on the request.
  EXPECT_TRUE(c.raw().ClosedByServer());
  auto held = fragments_->List("job-stalled");
  ASSERT_EQ(held.size(), 1u);
  EXPECT_EQ(held[0].bytes_received, bytes.size());
}

// A connection replayed byte for byte (a recorded PUT sent again) fails the key check: the
// server's nonce is new, so the recorded records are under another key.
TEST_F(DataPathTlsTest, AReplayedConnectionIsRefused) {
  const FragmentMeta meta = MetaFor(uint64_t{3} << 20);
  const std::vector<uint8_t> data = RandomBytes(meta.fragment_bytes);
  const FragmentKey key{"job-replay", 0, 1, 0};
  std::string recorded;
  {
    tessera::testing::TcpRelay proxy(tls_data_->port());
    DataPathClient client(ClientOf("n1"));
    uint32_t crc = 0;
    ASSERT_TRUE(client
                    .PutRange("n0", EndpointFor("n1", proxy.port()), key, meta, data.data(), 0,
                              data.size(), absl::Now() + absl::Seconds(20), &crc)
                    .ok());
    recorded = proxy.Captured(true);
  }
  ASSERT_TRUE(fragments_->DropFragment(key).ok());
  const uint64_t refused_before = tls_data_->stats().connections_refused;
  // The hello, the sealed proof and the start of the PUT (all the server reads before it
  // refuses).
  ASSERT_GT(recorded.size(), 4096u);
  RawConnection replay(tls_data_->port());
  replay.SendBytes(recorded.data(), 4096);
  peer::DataPathResponse challenge, answer;
  ASSERT_TRUE(replay.ReadResponse(&challenge));
  EXPECT_EQ(challenge.server_nonce().size(), kDataPathNonceBytes);
  ASSERT_TRUE(replay.ReadResponse(&answer));
  EXPECT_EQ(answer.code(), static_cast<int>(absl::StatusCode::kPermissionDenied));
  EXPECT_THAT(answer.message(), ::testing::HasSubstr("key check failed"));
  EXPECT_TRUE(replay.ClosedByServer());
  EXPECT_EQ(tls_data_->stats().connections_refused, refused_before + 1);
  EXPECT_EQ(fragments_->Get(key).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(fragments_->List("job-replay").empty());
}

// A connection speaks for the node whose key opened it: another node's key fails the key check,
// and writes naming another writer are refused (a version 1 hello too).
TEST_F(DataPathTlsTest, AConnectionSpeaksForItsNodeOnly) {
  {
    SealedConnection c(tls_data_->port(), "n1", tls_data_->SessionKeyFor("n9"));
    EXPECT_EQ(c.check_code(), static_cast<int>(absl::StatusCode::kPermissionDenied));
    EXPECT_THAT(c.check_message(),
                ::testing::HasSubstr("the data path key check failed for node 'n1'"));
    EXPECT_TRUE(c.raw().ClosedByServer());
  }
  {
    SealedConnection c(tls_data_->port(), "n9", tls_data_->SessionKeyFor("n9"));
    ASSERT_EQ(c.check_code(), 0) << c.check_message();
    const FragmentMeta meta = MetaFor(uint64_t{3} << 20);
    const FragmentKey key{"job-owner", 0, 1, 0};
    peer::DataPathRequest put = PutRequest(key, meta, 0, 4096);
    put.mutable_key()->set_owner_node_id("n1");
    c.SendFrame(put);
    c.SendChunk(0, std::string(4096, 'x'));
    peer::DataPathResponse answer;
    ASSERT_TRUE(c.ReadResponse(&answer));
    EXPECT_EQ(answer.code(), static_cast<int>(absl::StatusCode::kPermissionDenied));
    EXPECT_THAT(answer.message(),
                ::testing::HasSubstr("speaks for node 'n9' (its session key is that node's"));
    EXPECT_THAT(answer.message(), ::testing::HasSubstr("writes for node 'n1'"));
    EXPECT_EQ(fragments_->Get(key).status().code(), absl::StatusCode::kNotFound);
    // The connection stays in step: its own writes go through.
    put.mutable_key()->set_owner_node_id("n9");
    c.SendFrame(put);
    c.SendChunk(0, std::string(4096, 'y'));
    ASSERT_TRUE(c.ReadResponse(&answer));
    EXPECT_EQ(answer.code(), 0) << answer.message();
    EXPECT_EQ(answer.bytes_received(), 4096u);
  }
  {
    RawConnection c(tls_data_->port());
    peer::DataPathHello hello;
    hello.set_version(kDataPathVersionPlain);
    hello.set_session_key(tls_data_->session_key());
    c.SendFrame(hello);
    peer::DataPathResponse answer;
    ASSERT_TRUE(c.ReadResponse(&answer));
    EXPECT_EQ(answer.code(), static_cast<int>(absl::StatusCode::kFailedPrecondition));
    EXPECT_THAT(answer.message(), ::testing::HasSubstr("speaks version 2 (encrypted"));
    EXPECT_TRUE(c.ClosedByServer());
  }
  // A stale key (the daemon restarted) is kUnavailable, which the caller retries after asking
  // OpenDataPath again.
  DataPathClient stale(ClientOf("n1"));
  std::vector<uint8_t> buffer(4096);
  DataPathClient::Endpoint endpoint = EndpointFor("n1", tls_data_->port());
  endpoint.session_key = std::string(32, 'z');
  auto got = stale.GetRange("n0", endpoint, FragmentKey{"job", 0, 1, 0}, 0, 0, 0, buffer.data(),
                            buffer.size(), absl::Now() + absl::Seconds(5));
  EXPECT_EQ(got.status().code(), absl::StatusCode::kUnavailable) << got.status();
}

// A client that uses only encrypted paths sends to a peer offering the plain data path over
// gRPC streams (which TLS encrypts).
TEST_F(DataPathTlsTest, APlainDataPathOfferIsNotTakenUnderTls) {
  PeerService::Options po;
  po.self = MemberInfo{"n0", 1000, "127.0.0.1"};
  po.data_path_port = data_server_->port();  // version 1
  po.data_path_session_key = [key = data_server_->session_key()](const std::string&) {
    return key;
  };
  PeerService plain_offer(fragments_.get(), nullptr, po);
  auto files = ca_->IssueNode("n0b");
  ASSERT_TRUE(files.ok());
  grpc::ServerBuilder builder;
  PeerService::ConfigureServerBuilder(&builder);
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", PeerServerCredentials(*files), &port);
  builder.RegisterService(&plain_offer);
  auto server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  const std::string address = "127.0.0.1:" + std::to_string(port);
  auto n1 = TlsClient({"n1"}, "n1");
  const FragmentMeta meta = MetaFor(uint64_t{3} << 20);
  const std::vector<uint8_t> data = RandomBytes(meta.fragment_bytes);
  ASSERT_TRUE(n1->PutFragment(address, FragmentKey{"job-offer", 0, 1, 0}, meta, data.data(),
                              data.size())
                  .ok());
  EXPECT_EQ(n1->stats().grpc_puts, 1u);
  EXPECT_EQ(n1->stats().raw_puts, 0u);
  EXPECT_EQ(data_server_->stats().bytes_received, 0u);
  server->Shutdown();
}

TEST(HostOfAddressTest, SplitsHostsAndBracketedV6) {
  EXPECT_EQ(HostOfAddress("127.0.0.1:7070"), "127.0.0.1");
  EXPECT_EQ(HostOfAddress("node-3.tessera.svc:7070"), "node-3.tessera.svc");
  EXPECT_EQ(HostOfAddress("[::1]:7070"), "::1");
  EXPECT_EQ(HostOfAddress("0.0.0.0:0"), "0.0.0.0");
}

}  // namespace
}  // namespace tessera
