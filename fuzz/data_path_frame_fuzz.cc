// The raw TCP data path (daemon/transfer/data_path.h) as a hostile peer speaks it, both ways
// (version 1, plain; data_path_v2_fuzz drives the encrypted version 2):
//
// Server: a DataPathServer over a FragmentStore listens on loopback; each input is the byte
// stream one connection sends it (after a valid hello, unless flags bit 1), while everything the
// server answers is read. The stream is described in the grammar of fuzz/data_path_stream.h.
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
#include "fuzz/data_path_stream.h"
#include "fuzz/fuzz_util.h"
#include "proto/peer.pb.h"

namespace tessera {
namespace {

using data_path_wire::GetU32;
using data_path_wire::kMaxFrameBytes;
using fuzz::kConnectionLimit;

constexpr size_t kClientBufferBytes = size_t{1} << 20;
constexpr char kJob[] = "job-dp";

enum Flags : uint8_t { kClientMode = fuzz::kClientModeFlag, kNoHello = 1 << 1 };

// The fake peer of the client mode: serves one connection at a time with the bytes `answer`
// holds when it accepts, reading and dropping whatever the client sends.
class FakePeer {
 public:
  FakePeer() {
    listen_fd_ = fuzz::ListenLoopback(&port_);
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
  std::unique_ptr<fuzz::DataPathHost> host;
  std::unique_ptr<FakePeer> fake_peer;
};
State* state = nullptr;

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

void RunServer(uint8_t flags, fuzz::Input* in) {
  std::string stream;
  if (!(flags & kNoHello)) {
    peer::DataPathHello hello;
    hello.set_version(kDataPathVersionPlain);
    hello.set_session_key(state->host->server->session_key());
    stream = fuzz::Frame(hello.SerializeAsString());
  }
  stream += fuzz::StreamOf(in);
  fuzz::LoopbackConnection connection(state->host->server->port());
  connection.Send(stream);
  connection.Finish();
  CheckFirstAnswer(connection.received(), !(flags & kNoHello));
  state->host->CheckAndReset();
}

void RunClient(fuzz::Input* in) {
  const uint8_t op = in->U8();
  const uint64_t begin = in->U16();
  const uint64_t end = in->U16();
  state->fake_peer->SetAnswer(fuzz::StreamOf(in));
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
  const fuzz::SampleFragment sample(kJob);
  const std::string& fragment = sample.bytes;
  const peer::DataPathRequest& put = sample.put;
  const peer::DataPathRequest& seal = sample.seal;
  const peer::DataPathRequest& get = sample.get;
  const auto frame = fuzz::PutFrameRecord;
  const auto chunk = fuzz::PutChunkRecord;
  const uint64_t half = fuzz::SampleFragment::kHalf;
  seeds.push_back(std::string(1, '\0') + sample.Stream());
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
  const peer::DataPathResponse& range = sample.range;
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
  state->host = fuzz::DataPathHost::Start("data-path", /*encrypt=*/false);
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
  tessera::fuzz::RunDataPathInput(data, size, tessera::RunServer, tessera::RunClient);
  return 0;
}
