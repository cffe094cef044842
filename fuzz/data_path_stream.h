// What the data path fuzzers (data_path_frame_fuzz, data_path_v2_fuzz) share: the byte grammar
// their inputs describe a connection's stream with, a client connection to a server on loopback,
// and the fragment store the server writes into, with its invariants.
//
// Stream grammar (StreamOf): records, so that the fuzzer reaches valid requests and chunks as
// easily as broken ones:
//   [kind u8] then, by kind % 4:
//     0: [u16 n][n bytes] sent as one frame (the u32 length, then the bytes: a DataPathRequest)
//     1: [u16 n][n bytes] sent as they are
//     2: [u64 offset][u16 n][n bytes] a chunk: its header (offset, n, the CRC32C of the bytes,
//        or that CRC32C + 1 when kind & 4), then the bytes
//     3: [u64 offset][u32 size][u32 crc32c] a chunk header alone
#ifndef TESSERA_FUZZ_DATA_PATH_STREAM_H_
#define TESSERA_FUZZ_DATA_PATH_STREAM_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/time/time.h"
#include "daemon/store/capacity_budget.h"
#include "daemon/store/fragment_store.h"
#include "daemon/transfer/data_path.h"
#include "fuzz/fuzz_util.h"
#include "google/protobuf/message_lite.h"
#include "proto/peer.pb.h"

namespace tessera {
namespace fuzz {

// How long one connection of an input may take, at most.
inline constexpr absl::Duration kConnectionLimit = absl::Seconds(15);

// An input of a data path fuzzer: [flags u8], then client mode (flags bit 0: `client` reads the
// rest) or server mode (`server`, given the flags).
inline constexpr uint8_t kClientModeFlag = 1 << 0;
void RunDataPathInput(const uint8_t* data, size_t size, void (*server)(uint8_t flags, Input* in),
                      void (*client)(Input* in));

// `bytes` framed: their u32 length, then them.
std::string Frame(const std::string& bytes);
// A chunk: its header (offset, size, CRC32C of `data`, plus one when `bad_crc`), then `data`.
std::string ChunkBytes(uint64_t offset, const std::string& data, bool bad_crc);
// The bytes the records of `in` describe (the grammar above), to its end.
std::string StreamOf(Input* in);
// For seeds: a record of the grammar, a frame (kind 0) or a chunk (kind 2, or 6 for a bad CRC).
void PutFrameRecord(std::string* out, const google::protobuf::MessageLite& message);
void PutChunkRecord(std::string* out, uint64_t offset, const std::string& data, bool bad_crc);

// A fragment of RS(2, 1) of a 20000-byte shard, the requests that put it in two chunks (split at
// kHalf), seal it and read part of it back, and a peer's answer to a read of all of it, for seeds.
struct SampleFragment {
  static constexpr uint64_t kHalf = 5000;
  // `owner`: the node that writes it (a version 2 connection writes its own node's only).
  explicit SampleFragment(const std::string& job, const std::string& owner = "node-a");
  std::string bytes;
  peer::DataPathRequest put, seal, get;
  peer::DataPathResponse range;
  // The grammar's records of all that: put, both chunks, seal, get.
  std::string Stream() const;
};

// A socket listening on 127.0.0.1 (any free port: *port); Fail()s when it cannot.
int ListenLoopback(uint16_t* port);

// One client connection to a server on 127.0.0.1, within kConnectionLimit from its start: what
// it sends, and everything the server sends back. Fail()s when it cannot connect, or when the
// server neither answers nor closes in time.
class LoopbackConnection {
 public:
  explicit LoopbackConnection(uint16_t port);
  ~LoopbackConnection();
  LoopbackConnection(const LoopbackConnection&) = delete;
  LoopbackConnection& operator=(const LoopbackConnection&) = delete;

  // Sends `bytes` (reading meanwhile); stops early once the server closed its end.
  void Send(const std::string& bytes);
  // Reads until at least `bytes` were received in all, or the server closed. false then.
  bool ReceiveAtLeast(size_t bytes);
  // Half-closes, then reads until the server closes.
  void Finish();
  const std::string& received() const { return received_; }

 private:
  // One poll round: reads what is there, writes from `pending` what fits. false once closed.
  bool Pump(const std::string& pending, size_t* sent);

  int fd_ = -1;
  const absl::Time until_;
  bool server_closed_ = false;
  std::string received_;
};

// A FragmentStore in a scratch directory (32 MiB), and a data path server over it on loopback,
// short timeouts; writers named "fenced" are an older incarnation of a member.
struct DataPathHost {
  // encrypt: the server speaks version 2.
  static std::unique_ptr<DataPathHost> Start(const std::string& name, bool encrypt);
  // What an input may not break: every sealed fragment still matches its CRC32C and no
  // connection is left open. Then empties the store for the next input.
  void CheckAndReset();

  std::string directory;
  std::unique_ptr<CapacityBudget> budget;
  std::unique_ptr<FragmentStore> fragments;
  std::unique_ptr<DataPathServer> server;
};

}  // namespace fuzz
}  // namespace tessera

#endif  // TESSERA_FUZZ_DATA_PATH_STREAM_H_
