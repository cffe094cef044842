#include "fuzz/data_path_stream.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/crc32c.h"
#include "daemon/transfer/data_path_wire.h"
#include "ec/erasure_codec.h"

namespace tessera {
namespace fuzz {

using data_path_wire::ChunkHeader;
using data_path_wire::kChunkHeaderBytes;
using data_path_wire::PutU32;

void RunDataPathInput(const uint8_t* data, size_t size, void (*server)(uint8_t flags, Input* in),
                      void (*client)(Input* in)) {
  Input in(data, size);
  const uint8_t flags = in.U8();
  if (flags & kClientModeFlag) {
    client(&in);
  } else {
    server(flags, &in);
  }
}

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

std::string StreamOf(Input* in) {
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

void PutFrameRecord(std::string* out, const google::protobuf::MessageLite& message) {
  PutU8(out, 0);
  PutPiece(out, message.SerializeAsString());
}

void PutChunkRecord(std::string* out, uint64_t offset, const std::string& data, bool bad_crc) {
  PutU8(out, bad_crc ? 6 : 2);
  PutU64(out, offset);
  PutPiece(out, data);
}

SampleFragment::SampleFragment(const std::string& job, const std::string& owner) {
  const uint64_t fragment_bytes = ErasureCodec::FragmentBytes(20000, 2);
  bytes.resize(fragment_bytes);
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<char>(i * 131 + 7);
  put.set_op(peer::DataPathRequest::PUT_RANGE);
  put.mutable_key()->set_job_id(job);
  put.mutable_key()->set_rank(3);
  put.mutable_key()->set_step(10);
  put.mutable_key()->set_fragment_index(1);
  put.mutable_key()->set_owner_incarnation(5);
  put.mutable_key()->set_owner_node_id(owner);
  put.mutable_info()->set_ec_k(2);
  put.mutable_info()->set_ec_m(1);
  put.mutable_info()->set_shard_bytes(20000);
  put.mutable_info()->set_fragment_bytes(fragment_bytes);
  put.set_offset(0);
  put.set_length(fragment_bytes);
  seal = put;
  seal.set_op(peer::DataPathRequest::SEAL);
  seal.set_fragment_crc32c(Crc32c(bytes.data(), bytes.size()));
  get.set_op(peer::DataPathRequest::GET_RANGE);
  *get.mutable_key() = put.key();
  get.set_offset(100);
  get.set_length(7000);
  get.set_chunk_bytes(65536);
  range.mutable_fragment()->set_ec_k(2);
  range.mutable_fragment()->set_ec_m(1);
  range.mutable_fragment()->set_fragment_bytes(fragment_bytes);
  range.mutable_fragment()->set_shard_bytes(20000);
  range.set_sealed(true);
  range.set_bytes_received(fragment_bytes);
  range.set_offset(0);
  range.set_length(fragment_bytes);
}

std::string SampleFragment::Stream() const {
  std::string out;
  PutFrameRecord(&out, put);
  PutChunkRecord(&out, 0, bytes.substr(0, kHalf), false);
  PutChunkRecord(&out, kHalf, bytes.substr(kHalf), false);
  PutFrameRecord(&out, seal);
  PutFrameRecord(&out, get);
  return out;
}

int ListenLoopback(uint16_t* port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), len) != 0 || ::listen(fd, 16) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    Fail("cannot listen on 127.0.0.1");
  }
  *port = ntohs(addr.sin_port);
  return fd;
}

LoopbackConnection::LoopbackConnection(uint16_t port) : until_(absl::Now() + kConnectionLimit) {
  fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(port);
  if (::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    if (errno != EINTR) {
      Fail(absl::StrCat("cannot connect to the data path: ", std::strerror(errno)));
    }
    // libFuzzer's timer (SIGALRM) interrupted the call; the connection goes on: wait for it.
    pollfd p{fd_, POLLOUT, 0};
    int ready;
    while ((ready = ::poll(&p, 1, 10000)) < 0 && errno == EINTR) {
    }
    int error = 0;
    socklen_t len = sizeof(error);
    if (ready != 1 || ::getsockopt(fd_, SOL_SOCKET, SO_ERROR, &error, &len) != 0 || error != 0) {
      Fail(absl::StrCat("cannot connect to the data path (after a signal): ",
                        ready == 1 ? std::strerror(error) : "no connection in 10 s"));
    }
  }
  const int one = 1;
  ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

LoopbackConnection::~LoopbackConnection() { ::close(fd_); }

bool LoopbackConnection::Pump(const std::string& pending, size_t* sent) {
  if (absl::Now() > until_) {
    Fail("the data path server neither answered nor closed the connection in time");
  }
  const bool writing = sent != nullptr && *sent < pending.size();
  pollfd p{fd_, static_cast<short>(POLLIN | (writing ? POLLOUT : 0)), 0};
  if (::poll(&p, 1, 100) < 0) return true;
  if (p.revents & POLLIN) {
    char scratch[65536];
    const ssize_t n = ::recv(fd_, scratch, sizeof(scratch), 0);
    if (n == 0 || (n < 0 && errno != EINTR)) {  // closed, or reset by the server
      server_closed_ = true;
      return false;
    }
    if (n > 0 && received_.size() < (size_t{64} << 20)) {
      received_.append(scratch, static_cast<size_t>(n));
    }
  }
  if (writing && (p.revents & POLLOUT)) {
    const ssize_t n =
        ::send(fd_, pending.data() + *sent, pending.size() - *sent, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      *sent += static_cast<size_t>(n);
    } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
      *sent = pending.size();  // the server closed its end: the rest is not read
    }
  } else if ((p.revents & (POLLERR | POLLHUP)) && !(p.revents & POLLIN)) {
    server_closed_ = true;
    return false;
  }
  return true;
}

void LoopbackConnection::Send(const std::string& bytes) {
  size_t sent = 0;
  while (sent < bytes.size() && !server_closed_ && Pump(bytes, &sent)) {
  }
}

bool LoopbackConnection::ReceiveAtLeast(size_t bytes) {
  while (received_.size() < bytes) {
    if (server_closed_ || !Pump("", nullptr)) return false;
  }
  return true;
}

void LoopbackConnection::Finish() {
  ::shutdown(fd_, SHUT_WR);
  while (!server_closed_ && Pump("", nullptr)) {
  }
}

std::unique_ptr<DataPathHost> DataPathHost::Start(const std::string& name, bool encrypt) {
  auto host = std::make_unique<DataPathHost>();
  host->directory = ScratchDirectory(name);
  host->budget = std::make_unique<CapacityBudget>(uint64_t{32} << 20);
  FragmentStore::Options options;
  options.directory = host->directory;
  options.budget = host->budget.get();
  options.prefault = false;
  options.crc_threads = 1;
  options.precreate_spares = false;
  options.pool_max_bytes = 0;
  auto fragments = FragmentStore::Open(options);
  if (!fragments.ok()) Fail("fragment store: " + fragments.status().ToString());
  host->fragments = std::move(*fragments);
  DataPathServer::Options server;
  server.host = "127.0.0.1";
  server.io_timeout = absl::Seconds(3);
  server.hello_timeout = absl::Seconds(3);
  server.idle_timeout = absl::Seconds(3);
  server.encrypt = encrypt;
  server.is_fenced = [](const std::string& node_id, uint64_t) { return node_id == "fenced"; };
  auto started = DataPathServer::Start(host->fragments.get(), server);
  if (!started.ok()) Fail("data path server: " + started.status().ToString());
  host->server = std::move(*started);
  return host;
}

void DataPathHost::CheckAndReset() {
  for (const FragmentStatus& held : fragments->List("")) {
    if (held.state != SegmentState::kSealed) continue;
    auto view = fragments->Get(held.key, 0);
    FUZZ_CHECK(view.ok(), "a sealed fragment can be read: " + view.status().ToString());
    FUZZ_CHECK(Crc32c(view->data(), view->size()) == view->fragment_crc32c(),
               "a sealed fragment's bytes still match its CRC32C");
  }
  FUZZ_CHECK(server->stats().connections_open == 0, "a closed connection is not open");
  for (const FragmentStatus& held : fragments->List("")) fragments->DropJob(held.key.job_id);
}

}  // namespace fuzz
}  // namespace tessera
