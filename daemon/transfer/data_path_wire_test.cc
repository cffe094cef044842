// One connection's sealed sends and opened reads (data_path_wire.h) over a socket pair: a range
// sealed on the cipher pool arrives bit-exact with the CRC32C of each chunk computed where its
// records were opened, in reads of any size; a byte altered anywhere in the stream fails the read
// with DATA_LOSS.
#include "daemon/transfer/data_path_wire.h"

#include <sys/socket.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/crc32c.h"
#include "daemon/transfer/data_path.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tessera {
namespace data_path_wire {
namespace {

class DataPathWireTest : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = std::random_device{}();
    rng_.seed(seed_);
    std::printf("seed=%llu\n", static_cast<unsigned long long>(seed_));
  }

  std::vector<uint8_t> RandomBytes(size_t n) {
    std::vector<uint8_t> v(n);
    for (uint8_t& b : v) b = static_cast<uint8_t>(rng_());
    return v;
  }

  // Everything a sealed sender writes for `send`, as bytes on the wire.
  std::string Wire(const std::function<absl::Status(Io&)>& send) {
    int fds[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
    std::string wire;
    std::thread drain([&] {
      char buffer[65536];
      for (;;) {
        const ssize_t n = ::read(fds[1], buffer, sizeof(buffer));
        if (n <= 0) return;
        wire.append(buffer, static_cast<size_t>(n));
      }
    });
    RecordSealer sealer(key_, "to test");
    Io io;
    io.fd = fds[0];
    io.peer = "test";
    io.sealer = &sealer;
    EXPECT_TRUE(send(io).ok());
    ::shutdown(fds[0], SHUT_WR);
    drain.join();
    ::close(fds[0]);
    ::close(fds[1]);
    return wire;
  }

  // Reads `wire` back through an opener: receive(io) with io reading it.
  absl::Status Read(const std::string& wire, const std::function<absl::Status(Io&)>& receive) {
    int fds[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
    std::thread feed([&] {
      for (size_t pos = 0; pos < wire.size();) {
        const ssize_t n = ::send(fds[1], wire.data() + pos, wire.size() - pos, MSG_NOSIGNAL);
        if (n <= 0) return;  // the reader gave up
        pos += static_cast<size_t>(n);
      }
      ::shutdown(fds[1], SHUT_WR);  // a reader that wants more (a length altered) sees the end
    });
    RecordOpener opener(key_, "from test");
    Io io;
    io.fd = fds[0];
    io.peer = "test";
    io.opener = &opener;
    absl::Status status = receive(io);
    ::shutdown(fds[0], SHUT_RDWR);
    feed.join();
    ::close(fds[0]);
    ::close(fds[1]);
    return status;
  }

  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
  const std::string key_ = std::string(32, 'k');
};

// The header of the chunk at `pos` of a range of `size` bytes.
absl::StatusOr<ChunkHeader> NextChunk(Io& io, size_t pos, size_t size) {
  uint8_t encoded[kChunkHeaderBytes];
  TESSERA_RETURN_IF_ERROR(io.Recv(encoded, sizeof(encoded)));
  const ChunkHeader chunk = ChunkHeader::Decode(encoded);
  if (chunk.offset != pos || chunk.size == 0 || chunk.size > size - pos) {
    return absl::DataLossError("a chunk out of place");
  }
  return chunk;
}

// The chunks of a range, read as the data path's receivers do: header, then the chunk with its
// CRC32C. `crcs` gets each chunk's CRC as computed by RecvChecked.
absl::Status ReadChunks(Io& io, uint8_t* dst, size_t size, std::vector<uint32_t>* sent,
                        std::vector<uint32_t>* computed) {
  for (size_t pos = 0; pos < size;) {
    TESSERA_ASSIGN_OR_RETURN(const ChunkHeader chunk, NextChunk(io, pos, size));
    uint32_t crc = 0;
    TESSERA_RETURN_IF_ERROR(io.RecvChecked(dst + pos, chunk.size, &crc));
    sent->push_back(chunk.crc32c);
    computed->push_back(crc);
    pos += chunk.size;
  }
  return absl::OkStatus();
}

// The same, as the data path's receivers now read: each chunk started (RecvStart) before the one
// before is finished (RecvFinish), or finished sooner while the connection waits (WaitHook).
// *finished_in_waits counts the chunks finished so.
absl::Status ReadChunksPipelined(Io& io, uint8_t* dst, size_t size, std::vector<uint32_t>* sent,
                                 std::vector<uint32_t>* computed, int* finished_in_waits) {
  struct InFlight {
    Io::PendingRecv pending;
    uint32_t sent_crc = 0;
  };
  std::unique_ptr<InFlight> in_flight;
  bool waiting = false;
  auto finish = [&]() -> absl::Status {
    if (!in_flight) return absl::OkStatus();
    std::unique_ptr<InFlight> done = std::move(in_flight);
    TESSERA_ASSIGN_OR_RETURN(const uint32_t crc, io.RecvFinish(&done->pending));
    sent->push_back(done->sent_crc);
    computed->push_back(crc);
    if (waiting) ++*finished_in_waits;
    return absl::OkStatus();
  };
  WaitHook hook(&io, [&] {
    waiting = true;
    absl::Status status = finish();
    waiting = false;
    return status;
  });
  for (size_t pos = 0; pos < size;) {
    TESSERA_ASSIGN_OR_RETURN(const ChunkHeader chunk, NextChunk(io, pos, size));
    auto next = std::make_unique<InFlight>();
    next->sent_crc = chunk.crc32c;
    TESSERA_RETURN_IF_ERROR(io.RecvStart(dst + pos, chunk.size, &next->pending));
    TESSERA_RETURN_IF_ERROR(finish());
    in_flight = std::move(next);
    pos += chunk.size;
  }
  return finish();
}

TEST_F(DataPathWireTest, ARangeSealedOnThePoolArrivesWithEachChunksCrc) {
  for (const size_t size : {size_t{300} << 10, (size_t{9} << 20) + 12345}) {
    SCOPED_TRACE(size);
    const std::vector<uint8_t> data = RandomBytes(size);
    uint32_t range_crc = 0;
    const std::string wire = Wire(
        [&](Io& io) { return io.SendChunks(data.data(), 0, size, size_t{1} << 20, &range_crc); });
    EXPECT_EQ(range_crc, Crc32c(data.data(), size));
    EXPECT_EQ(wire.find(std::string(reinterpret_cast<const char*>(data.data()), 64)),
              std::string::npos)
        << "the plaintext shows on the wire";
    std::vector<uint8_t> back(size);
    std::vector<uint32_t> sent, computed;
    ASSERT_TRUE(Read(wire, [&](Io& io) {
                  return ReadChunks(io, back.data(), size, &sent, &computed);
                }).ok());
    EXPECT_EQ(back, data);
    EXPECT_EQ(computed, sent);
    // A byte altered in the header, a chunk's bytes or a tag: the read fails as DATA_LOSS.
    for (int trial = 0; trial < 4; ++trial) {
      std::string altered = wire;
      const size_t at = rng_() % altered.size();
      altered[at] = static_cast<char>(altered[at] ^ (1 << (rng_() % 8)));
      sent.clear();
      computed.clear();
      const absl::Status read = Read(
          altered, [&](Io& io) { return ReadChunks(io, back.data(), size, &sent, &computed); });
      EXPECT_EQ(read.code(), absl::StatusCode::kDataLoss) << "byte " << at << ": " << read;
    }
  }
}

// A range of several sealed chunks read with each chunk's records still being opened while the
// next is read: bit-exact, each chunk's CRC32C as sent; a byte altered anywhere fails the read
// with DATA_LOSS, and no chunk at or after the damaged one is finished as good.
TEST_F(DataPathWireTest, ChunksReadWhileTheOneBeforeIsOpenedArriveExactAndDamageIsCaught) {
  const size_t size = (size_t{13} << 20) + 4321;  // sealed chunks of 4 MiB: 4
  const std::vector<uint8_t> data = RandomBytes(size);
  const std::string wire =
      Wire([&](Io& io) { return io.SendChunks(data.data(), 0, size, size_t{1} << 20, nullptr); });
  std::vector<uint8_t> back(size);
  std::vector<uint32_t> sent, computed;
  int in_waits = 0;
  const absl::Status read = Read(wire, [&](Io& io) {
    return ReadChunksPipelined(io, back.data(), size, &sent, &computed, &in_waits);
  });
  ASSERT_TRUE(read.ok()) << read;
  EXPECT_EQ(back, data);
  ASSERT_EQ(sent.size(), 4u);
  EXPECT_EQ(computed, sent);
  std::printf("chunks finished while the connection waited: %d of 4\n", in_waits);
  // On the wire a chunk is its header's record (36 bytes) and records of 256 KiB (+ 20 bytes).
  const size_t chunk_on_wire = 36 + 16 * (4 + (size_t{256} << 10) + 16);
  for (int trial = 0; trial < 6; ++trial) {
    std::string altered = wire;
    const size_t at = rng_() % altered.size();
    altered[at] = static_cast<char>(altered[at] ^ (1 << (rng_() % 8)));
    sent.clear();
    computed.clear();
    const absl::Status damaged = Read(altered, [&](Io& io) {
      return ReadChunksPipelined(io, back.data(), size, &sent, &computed, &in_waits);
    });
    EXPECT_EQ(damaged.code(), absl::StatusCode::kDataLoss) << "byte " << at << ": " << damaged;
    EXPECT_LE(sent.size(), at / chunk_on_wire)
        << "byte " << at << " is in chunk " << at / chunk_on_wire;
    EXPECT_EQ(computed, sent);
  }
}

// Records of any size (sealed one per send, some longer than a read) read back in reads of any
// size: each read's CRC32C is that of its bytes.
TEST_F(DataPathWireTest, ReadsOfAnySizeGetTheirBytesCrc) {
  const std::vector<uint8_t> data = RandomBytes(size_t{3} << 20);
  const std::string wire = Wire([&](Io& io) {
    for (size_t pos = 0; pos < data.size();) {
      const size_t n = std::min(data.size() - pos, 1 + rng_() % (size_t{600} << 10));
      iovec v{const_cast<uint8_t*>(data.data()) + pos, n};
      TESSERA_RETURN_IF_ERROR(io.Send(&v, 1));
      pos += n;
    }
    return absl::OkStatus();
  });
  std::vector<uint8_t> back(data.size());
  ASSERT_TRUE(Read(wire, [&](Io& io) {
                for (size_t pos = 0; pos < data.size();) {
                  const size_t n = std::min(data.size() - pos, 1 + rng_() % (size_t{700} << 10));
                  uint32_t crc = 0;
                  TESSERA_RETURN_IF_ERROR(io.RecvChecked(back.data() + pos, n, &crc));
                  if (crc != Crc32c(data.data() + pos, n)) {
                    return absl::InternalError(absl::StrCat("the CRC of bytes at ", pos));
                  }
                  pos += n;
                }
                return absl::OkStatus();
              }).ok());
  EXPECT_EQ(back, data);
}

// Each wait is counted as what it was for, summed, and the longest of each kind kept until reset
// (what transfer_bench and tessera_data_path_wait_seconds_total show).
TEST(DataPathWaitsTest, WaitsAreCountedByKindWithTheLongestOfEach) {
  EXPECT_EQ(SocketWaitKind(POLLOUT, false, false), WaitKind::kSend);
  EXPECT_EQ(SocketWaitKind(POLLOUT, true, true), WaitKind::kSend);
  EXPECT_EQ(SocketWaitKind(POLLIN, true, false), WaitKind::kRecv);
  EXPECT_EQ(SocketWaitKind(POLLIN, true, true), WaitKind::kRecv) << "a client mid-range";
  EXPECT_EQ(SocketWaitKind(POLLIN, false, true), WaitKind::kReply);
  EXPECT_EQ(SocketWaitKind(POLLIN, false, false), std::nullopt) << "a server between requests";

  const uint64_t seed = std::random_device{}();
  std::printf("seed=%llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  ResetLongestDataPathWaits();
  const DataPathWaits before = DataPathWaitTotals();
  EXPECT_EQ(before.longest_seal_ns + before.longest_open_ns + before.longest_send_ns +
                before.longest_recv_ns + before.longest_reply_ns,
            0u);
  uint64_t sums[5] = {};
  uint64_t longest[5] = {};
  for (int i = 0; i < 200; ++i) {
    const int kind = static_cast<int>(rng() % 5);
    const uint64_t ns = rng() % 50'000'000;
    AddWait(static_cast<WaitKind>(kind), absl::Nanoseconds(ns));
    sums[kind] += ns;
    longest[kind] = std::max(longest[kind], ns);
  }
  AddWait(WaitKind::kRecv, absl::Nanoseconds(-5));  // a clock that stepped back counts nothing
  const DataPathWaits after = DataPathWaitTotals();
  EXPECT_EQ(after.seal_ns - before.seal_ns, sums[0]);
  EXPECT_EQ(after.open_ns - before.open_ns, sums[1]);
  EXPECT_EQ(after.send_ns - before.send_ns, sums[2]);
  EXPECT_EQ(after.recv_ns - before.recv_ns, sums[3]);
  EXPECT_EQ(after.reply_ns - before.reply_ns, sums[4]);
  EXPECT_EQ(after.longest_seal_ns, longest[0]);
  EXPECT_EQ(after.longest_open_ns, longest[1]);
  EXPECT_EQ(after.longest_send_ns, longest[2]);
  EXPECT_EQ(after.longest_recv_ns, longest[3]);
  EXPECT_EQ(after.longest_reply_ns, longest[4]);
  ResetLongestDataPathWaits();
  AddWait(WaitKind::kOpen, absl::Microseconds(7));
  const DataPathWaits reset = DataPathWaitTotals();
  EXPECT_EQ(reset.longest_open_ns, 7000u);
  EXPECT_EQ(reset.longest_seal_ns + reset.longest_send_ns + reset.longest_recv_ns +
                reset.longest_reply_ns,
            0u);
  EXPECT_EQ(reset.open_ns - after.open_ns, 7000u) << "the totals are not reset";
}

}  // namespace
}  // namespace data_path_wire
}  // namespace tessera
