// The raw TCP data path (daemon/transfer/data_path.h) as a hostile peer speaks it, both ways:
//
// Server: a DataPathServer over a FragmentStore listens on loopback; each input is the byte
// stream one connection sends it (after a valid hello, unless flags bit 1), while everything the
// server answers is read. The stream is built from records, so that the fuzzer can reach valid
// requests and chunks as easily as broken ones:
//   [kind u8] then, by kind % 4:
//     0: [u16 n][n bytes] sent as one frame (the u32 length, then the bytes: a DataPathRequest)
//     1: [u16 n][n bytes] sent as they are
//     2: [u64 offset][u16 n][n bytes] a chunk: its header (offset, n, the CRC32C of the bytes,
//        or that CRC32C + 1 when kind & 4), then the bytes
//     3: [u64 offset][u32 size][u32 crc32c] a chunk header alone
// Invariants: the server answers and closes the connection once the stream ends (within the
// time the harness allows); every frame it sends is well formed; a connection never breaks the
// store: each sealed fragment still matches its CRC32C, and no connection stays open.
//
// Client (flags bit 0): DataPathClient asks a fake peer, which answers with the input's bytes
// (after [op u8]): a GetRange, PutRange or Seal. Invariants: the call returns within its
// deadline; a GetRange that succeeds read a range inside the fragment and the caller's buffer,
// and the CRC32C it returns is that of the bytes it wrote.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/crc32c.h"
#include "daemon/store/capacity_budget.h"
#include "daemon/store/fragment_store.h"
#include "daemon/transfer/data_path.h"
#include "daemon/transfer/data_path_wire.h"
#include "ec/erasure_codec.h"
#include "fuzz/fuzz_util.h"
#include "proto/peer.pb.h"

namespace tessera {
namespace {

using data_path_wire::ChunkHeader;
using data_path_wire::GetU32;
using data_path_wire::kChunkHeaderBytes;
using data_path_wire::kMaxFrameBytes;
using data_path_wire::PutU32;

constexpr absl::Duration kConnectionLimit = absl::Seconds(15);
constexpr size_t kClientBufferBytes = size_t{1} << 20;
constexpr char kJob[] = "job-dp";

enum Flags : uint8_t { kClientMode = 1 << 0, kNoHello = 1 << 1 };

// The fake peer of the client mode: serves one connection at a time with the bytes `answer`
// holds when it accepts, reading and dropping whatever the client sends.
class FakePeer {
 public:
  FakePeer() {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), len) != 0 ||
        ::listen(listen_fd_, 16) != 0 ||
        ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      fuzz::Fail("the fake peer cannot listen");
    }
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] { Loop(); });
    thread_.detach();
  }
  uint16_t port() const { return port_; }
  void SetAnswer(std::string answer) {
    std::lock_guard<std::mutex> lock(mu_);
    answer_ = std::move(answer);
  }

 private:
  void Loop() {
    for (;;) {
      const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      std::string answer;
      {
        std::lock_guard<std::mutex> lock(mu_);
        answer = answer_;
      }
      size_t sent = 0;
      bool shut = false;
      const absl::Time until = absl::Now() + kConnectionLimit;
      char scratch[65536];
      while (absl::Now() < until) {
        pollfd p{fd, static_cast<short>(POLLIN | (sent < answer.size() ? POLLOUT : 0)), 0};
        if (::poll(&p, 1, 100) < 0) break;
        if (p.revents & POLLIN) {
          const ssize_t n = ::recv(fd, scratch, sizeof(scratch), 0);
          if (n <= 0) break;  // the client closed
        }
        if (sent < answer.size() && (p.revents & POLLOUT)) {
          const ssize_t n = ::send(fd, answer.data() + sent, answer.size() - sent, MSG_NOSIGNAL);
          if (n < 0) break;
          sent += static_cast<size_t>(n);
        }
        if (sent == answer.size() && !shut) {
          ::shutdown(fd, SHUT_WR);
          shut = true;
        }
        if (p.revents & (POLLERR | POLLHUP)) break;
      }
      ::close(fd);
    }
  }

  int listen_fd_ = -1;
  uint16_t port_ = 0;
  std::thread thread_;
  std::mutex mu_;
  std::string answer_;
};

struct State {
  std::string directory;
  std::unique_ptr<CapacityBudget> budget;
  std::unique_ptr<FragmentStore> fragments;
  std::unique_ptr<DataPathServer> server;
  std::unique_ptr<FakePeer> fake_peer;
};
State* state = nullptr;

std::string Frame(const std::string& bytes) {
  std::string out(4, '\0');
  PutU32(reinterpret_cast<uint8_t*>(out.data()), static_cast<uint32_t>(bytes.size()));
  return out + bytes;
}

std::string ChunkBytes(uint64_t offset, const std::string& data, bool bad_crc) {
  ChunkHeader chunk;
  chunk.offset = offset;
  chunk.size = static_cast<uint32_t>(data.size());
  chunk.crc32c = Crc32c(data.data(), data.size()) + (bad_crc ? 1 : 0);
  std::string out(kChunkHeaderBytes, '\0');
  chunk.Encode(reinterpret_cast<uint8_t*>(out.data()));
  return out + data;
}

// The bytes the records of `in` describe.
std::string StreamOf(fuzz::Input* in) {
  std::string out;
  while (in->left() > 0) {
    const uint8_t kind = in->U8();
    switch (kind % 4) {
      case 0:
        out += Frame(in->Piece());
        break;
      case 1:
        out += in->Piece();
        break;
      case 2: {
        const uint64_t offset = in->U64();
        out += ChunkBytes(offset, in->Piece(), (kind & 4) != 0);
        break;
      }
      case 3: {
        ChunkHeader chunk;
        chunk.offset = in->U64();
        chunk.size = in->U32();
        chunk.crc32c = in->U32();
        std::string header(kChunkHeaderBytes, '\0');
        chunk.Encode(reinterpret_cast<uint8_t*>(header.data()));
        out += header;
        break;
      }
    }
  }
  return out;
}

int ConnectLoopback(uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(port);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    fuzz::Fail(absl::StrCat("cannot connect to the data path: ", std::strerror(errno)));
  }
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return fd;
}

// Sends `stream` on a new connection to the server, then half-closes it, reading everything the
// server sends until it closes. Returns what it sent.
std::string Exchange(const std::string& stream) {
  const int fd = ConnectLoopback(state->server->port());
  std::string received;
  size_t sent = 0;
  bool shut = false;
  const absl::Time until = absl::Now() + kConnectionLimit;
  char scratch[65536];
  for (;;) {
    if (absl::Now() > until) {
      fuzz::Fail("the data path server neither answered nor closed the connection in time");
    }
    if (sent == stream.size() && !shut) {
      ::shutdown(fd, SHUT_WR);
      shut = true;
    }
    pollfd p{fd, static_cast<short>(POLLIN | (sent < stream.size() ? POLLOUT : 0)), 0};
    if (::poll(&p, 1, 100) < 0) continue;
    if (p.revents & POLLIN) {
      const ssize_t n = ::recv(fd, scratch, sizeof(scratch), 0);
      if (n == 0) break;  // the server closed
      if (n < 0) {
        if (errno == EINTR) continue;
        break;  // reset by the server
      }
      if (received.size() < (size_t{64} << 20)) received.append(scratch, static_cast<size_t>(n));
    }
    if (sent < stream.size() && (p.revents & POLLOUT)) {
      const ssize_t n =
          ::send(fd, stream.data() + sent, stream.size() - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) {
        sent += static_cast<size_t>(n);
      } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
        sent = stream.size();  // the server closed its end: the rest is not read
      }
    } else if (p.revents & (POLLERR | POLLHUP) && !(p.revents & POLLIN)) {
      break;
    }
  }
  ::close(fd);
  return received;
}

// The server's first answer is a frame with a DataPathResponse.
void CheckFirstAnswer(const std::string& received, bool valid_hello) {
  if (received.size() < 4) {
    FUZZ_CHECK(!valid_hello, "a valid hello is answered");
    return;
  }
  const uint32_t size = GetU32(reinterpret_cast<const uint8_t*>(received.data()));
  FUZZ_CHECK(size <= kMaxFrameBytes && size <= received.size() - 4,
             "the server's first frame is whole");
  peer::DataPathResponse response;
  FUZZ_CHECK(response.ParseFromArray(received.data() + 4, static_cast<int>(size)),
             "the server answers a DataPathResponse");
  if (valid_hello) FUZZ_CHECK(response.code() == 0, "a valid hello is accepted");
}

void CheckStore() {
  for (const FragmentStatus& held : state->fragments->List("")) {
    if (held.state != SegmentState::kSealed) continue;
    auto view = state->fragments->Get(held.key, 0);
    FUZZ_CHECK(view.ok(), "a sealed fragment can be read: " + view.status().ToString());
    FUZZ_CHECK(Crc32c(view->data(), view->size()) == view->fragment_crc32c(),
               "a sealed fragment's bytes still match its CRC32C");
  }
  FUZZ_CHECK(state->server->stats().connections_open == 0, "a closed connection is not open");
  // Each input starts from an empty store.
  for (const FragmentStatus& held : state->fragments->List("")) {
    state->fragments->DropJob(held.key.job_id);
  }
}

void RunServer(uint8_t flags, fuzz::Input* in) {
  std::string stream;
  if (!(flags & kNoHello)) {
    peer::DataPathHello hello;
    hello.set_version(kDataPathVersionPlain);
    hello.set_session_key(state->server->session_key());
    stream = Frame(hello.SerializeAsString());
  }
  stream += StreamOf(in);
  const std::string received = Exchange(stream);
  CheckFirstAnswer(received, !(flags & kNoHello));
  CheckStore();
}

void RunClient(fuzz::Input* in) {
  const uint8_t op = in->U8();
  const uint64_t begin = in->U16();
  const uint64_t end = in->U16();
  state->fake_peer->SetAnswer(StreamOf(in));
  DataPathClient client(DataPathClient::Options{});
  DataPathClient::Endpoint endpoint{"127.0.0.1", state->fake_peer->port(), "key"};
  const FragmentKey key{kJob, 1, 2, 0};
  FragmentMeta meta{7, 2, 1, ErasureCodec::FragmentBytes(4096, 2), 4096, 0};
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  const absl::Time started = absl::Now();
  switch (op % 3) {
    case 0: {
      std::vector<uint8_t> buffer(kClientBufferBytes);
      auto read = client.GetRange("peer", endpoint, key, 7, begin, end, buffer.data(),
                                  buffer.size(), deadline);
      if (read.ok()) {
        FUZZ_CHECK(read->begin <= read->end && read->end <= read->meta.fragment_bytes &&
                       read->meta.fragment_bytes <= buffer.size(),
                   "a range read lies in the fragment and the buffer");
        if (read->end > read->begin) {
          FUZZ_CHECK(
              Crc32c(buffer.data() + read->begin, read->end - read->begin) == read->range_crc32c,
              "a range read's CRC32C is that of the bytes written");
        }
      }
      break;
    }
    case 1: {
      std::vector<uint8_t> data(meta.fragment_bytes, 0x42);
      uint32_t crc = 0;
      (void)client.PutRange("peer", endpoint, key, meta, data.data(), begin % data.size(),
                            data.size(), deadline, &crc);
      break;
    }
    case 2:
      (void)client.Seal("peer", endpoint, key, meta, 0x1234, deadline);
      break;
  }
  FUZZ_CHECK(absl::Now() - started < absl::Seconds(10), "a data path call keeps its deadline");
}

std::vector<std::string> Seeds() {
  std::vector<std::string> seeds;
  // A fragment of RS(2, 1) of a 20000-byte shard, put in two chunks, sealed, read back.
  const uint64_t fragment_bytes = ErasureCodec::FragmentBytes(20000, 2);
  std::string fragment(fragment_bytes, '\0');
  for (size_t i = 0; i < fragment.size(); ++i) fragment[i] = static_cast<char>(i * 131 + 7);
  peer::DataPathRequest put;
  put.set_op(peer::DataPathRequest::PUT_RANGE);
  put.mutable_key()->set_job_id(kJob);
  put.mutable_key()->set_rank(3);
  put.mutable_key()->set_step(10);
  put.mutable_key()->set_fragment_index(1);
  put.mutable_key()->set_owner_incarnation(5);
  put.mutable_key()->set_owner_node_id("node-a");
  put.mutable_info()->set_ec_k(2);
  put.mutable_info()->set_ec_m(1);
  put.mutable_info()->set_shard_bytes(20000);
  put.mutable_info()->set_fragment_bytes(fragment_bytes);
  put.set_offset(0);
  put.set_length(fragment_bytes);
  auto frame = [](std::string* out, const google::protobuf::MessageLite& m) {
    fuzz::PutU8(out, 0);
    fuzz::PutPiece(out, m.SerializeAsString());
  };
  auto chunk = [](std::string* out, uint64_t offset, const std::string& data, bool bad) {
    fuzz::PutU8(out, bad ? 6 : 2);
    fuzz::PutU64(out, offset);
    fuzz::PutPiece(out, data);
  };
  const uint64_t half = 5000;
  std::string whole(1, '\0');
  frame(&whole, put);
  chunk(&whole, 0, fragment.substr(0, half), false);
  chunk(&whole, half, fragment.substr(half), false);
  peer::DataPathRequest seal = put;
  seal.set_op(peer::DataPathRequest::SEAL);
  seal.set_fragment_crc32c(Crc32c(fragment.data(), fragment.size()));
  frame(&whole, seal);
  peer::DataPathRequest get;
  get.set_op(peer::DataPathRequest::GET_RANGE);
  *get.mutable_key() = put.key();
  get.set_offset(100);
  get.set_length(7000);
  get.set_chunk_bytes(65536);
  frame(&whole, get);
  seeds.push_back(whole);
  // A chunk damaged on the wire, then sent again; then a put over the sealed fragment.
  std::string again(1, '\0');
  frame(&again, put);
  chunk(&again, 0, fragment.substr(0, half), true);
  chunk(&again, half, fragment.substr(half), false);
  frame(&again, seal);
  frame(&again, put);
  chunk(&again, 0, fragment.substr(0, half), false);
  chunk(&again, half, std::string(fragment.size() - half, 'x'), false);
  frame(&again, get);
  seeds.push_back(again);
  // A chunk out of place, and a frame too long.
  std::string wrong(1, '\0');
  frame(&wrong, put);
  fuzz::PutU8(&wrong, 3);
  fuzz::PutU64(&wrong, 8);
  fuzz::PutU32(&wrong, 100);
  fuzz::PutU32(&wrong, 0);
  seeds.push_back(wrong);
  std::string huge(1, '\0');
  fuzz::PutU8(&huge, 1);
  fuzz::PutPiece(&huge, std::string("\xff\xff\xff\x7f", 4));
  seeds.push_back(huge);
  // No hello: a hello with a wrong key.
  peer::DataPathHello hello;
  hello.set_version(kDataPathVersionPlain);
  hello.set_session_key("0123456789abcdef");
  std::string bad_hello(1, static_cast<char>(kNoHello));
  frame(&bad_hello, hello);
  frame(&bad_hello, get);
  seeds.push_back(bad_hello);
  // Client mode: a peer's answers to a GetRange (hello OK, then a response and its chunks).
  peer::DataPathResponse ok;
  peer::DataPathResponse range;
  range.mutable_fragment()->set_ec_k(2);
  range.mutable_fragment()->set_ec_m(1);
  range.mutable_fragment()->set_fragment_bytes(fragment_bytes);
  range.mutable_fragment()->set_shard_bytes(20000);
  range.set_sealed(true);
  range.set_bytes_received(fragment_bytes);
  range.set_offset(0);
  range.set_length(fragment_bytes);
  for (uint8_t op : {0, 1, 2}) {
    std::string client(1, static_cast<char>(kClientMode));
    fuzz::PutU8(&client, op);
    fuzz::PutU16(&client, 0);
    fuzz::PutU16(&client, 0);
    frame(&client, ok);
    frame(&client, op == 0 ? range : ok);
    if (op == 0) {
      chunk(&client, 0, fragment.substr(0, half), false);
      chunk(&client, half, fragment.substr(half), false);
    }
    seeds.push_back(client);
  }
  return seeds;
}

void Initialize() {
  state = new State;
  state->directory = fuzz::ScratchDirectory("data-path");
  state->budget = std::make_unique<CapacityBudget>(uint64_t{32} << 20);
  FragmentStore::Options options;
  options.directory = state->directory;
  options.budget = state->budget.get();
  options.prefault = false;
  options.crc_threads = 1;
  options.precreate_spares = false;
  options.pool_max_bytes = 0;
  auto fragments = FragmentStore::Open(options);
  if (!fragments.ok()) fuzz::Fail("fragment store: " + fragments.status().ToString());
  state->fragments = std::move(*fragments);
  DataPathServer::Options server;
  server.host = "127.0.0.1";
  server.io_timeout = absl::Seconds(3);
  server.hello_timeout = absl::Seconds(3);
  server.idle_timeout = absl::Seconds(3);
  // Writers named "fenced" are an older incarnation of a member.
  server.is_fenced = [](const std::string& node_id, uint64_t) { return node_id == "fenced"; };
  auto started = DataPathServer::Start(state->fragments.get(), server);
  if (!started.ok()) fuzz::Fail("data path server: " + started.status().ToString());
  state->server = std::move(*started);
  state->fake_peer = std::make_unique<FakePeer>();
}

}  // namespace
}  // namespace tessera

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tessera::fuzz::Setup(tessera::Seeds);
  tessera::Initialize();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  tessera::fuzz::Input in(data, size);
  const uint8_t flags = in.U8();
  if (flags & tessera::kClientMode) {
    tessera::RunClient(&in);
  } else {
    tessera::RunServer(flags, &in);
  }
  return 0;
}
