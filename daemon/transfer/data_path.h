// The raw TCP data path between daemons (proto/peer.proto, "Raw TCP data path"): fragments move
// over reused TCP connections instead of gRPC streams. A daemon announces the port, the version
// and a session key through the gRPC call Peer.OpenDataPath, so the peer port stays the one place
// where daemons find each other.
//   version 1 (no TLS: cluster.token, or an insecure cluster): plain TCP; a connection presents
//     the per-incarnation key, the same for every peer, in its hello.
//   version 2 (mutual TLS on the peer port): the key, new with each incarnation, is the calling
//     node's own (derived for the node its certificate names); a connection proves that it holds
//     it without sending it, and every byte after the handshake goes in AES-256-GCM records
//     under keys of that connection alone (data_path_crypto.h). A connection speaks for its
//     node only: writes naming another writer are refused.
//
// Why: on loopback, a gRPC stream moved a 21 MiB fragment at 0.28 of a plain TCP stream's rate on
// a 2-core machine (bench/protection_bench's "put" line). HTTP/2 framing, gRPC's threads and a
// copy out of gRPC's buffers all cost CPU that the fragment's bytes need. Here a PUT_RANGE's
// chunks are read from the socket straight into the fragment's shared-memory segment
// (FragmentStore::ReceiveChunk) and checked there, and a GET_RANGE's bytes are written to the
// socket straight from the segment, or read into the caller's memory (a rebuilt shard's slot).
//
//   DataPathServer  a daemon's listener: one thread per connection, requests served against its
//                   FragmentStore;
//   DataPathClient  a pool of idle connections per peer, and the three requests.
//
// Deadlines. Every read and write waits in poll(): a client call has one deadline for the whole
// request (GrpcPeerClient gives it time for its bytes); the server gives up on a request whose
// next bytes do not come within Options::io_timeout, and closes a connection idle for
// Options::idle_timeout. Clients reuse an idle connection for at most a minute, so the
// connections of a large cluster do not pile up between snapshots.
#ifndef TESSERA_DAEMON_TRANSFER_DATA_PATH_H_
#define TESSERA_DAEMON_TRANSFER_DATA_PATH_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "daemon/store/fragment_store.h"
#include "daemon/transfer/data_path_crypto.h"
#include "daemon/transfer/peer_service.h"
#include "proto/peer.pb.h"

namespace tessera {

namespace data_path_wire {
struct Io;
}  // namespace data_path_wire

class DataPathServer {
 public:
  struct Options {
    // The host or address to listen on, as in peer.listen_address ("0.0.0.0", "127.0.0.1",
    // "[::]", a name); the port is `port` (0: any free one, see port()).
    std::string host;
    uint16_t port = 0;
    size_t default_chunk_bytes = kDefaultChunkBytes;   // GET_RANGE chunks when not asked
    absl::Duration io_timeout = absl::Seconds(30);     // a request's next bytes, at most
    absl::Duration hello_timeout = absl::Seconds(5);   // a new connection's DataPathHello
    // A connection with no request for this long is closed (clients drop theirs sooner).
    absl::Duration idle_timeout = absl::Minutes(5);
    // Connections served at once (a thread each); more are closed at once, counted as refused.
    int max_connections = 4096;
    // Membership's fence: PUT_RANGE and SEAL of a writer it names are refused
    // (kFailedPrecondition). Empty: every writer is accepted.
    WriterFence is_fenced;
    // Version 2, encrypted (the daemon runs mutual TLS): version 1 hellos are refused. false:
    // version 1, and version 2 hellos are refused.
    bool encrypt = false;
  };

  struct Stats {
    uint64_t connections_accepted = 0;
    uint64_t connections_refused = 0;  // bad hello (key, version, framing)
    uint64_t records_refused = 0;      // version 2: records that did not authenticate
    uint64_t connections_open = 0;
    uint64_t requests = 0;
    uint64_t request_errors = 0;       // answered with a non-OK code
    uint64_t bytes_received = 0;       // PUT_RANGE chunk bytes stored
    uint64_t bytes_sent = 0;           // GET_RANGE chunk bytes
  };

  // Listens and starts accepting. `fragments` is not owned and must outlive the server.
  // Errors: kInvalidArgument (bad options), kUnavailable (cannot listen: the address and why).
  static absl::StatusOr<std::unique_ptr<DataPathServer>> Start(FragmentStore* fragments,
                                                               Options options);
  ~DataPathServer();  // Stop()
  DataPathServer(const DataPathServer&) = delete;
  DataPathServer& operator=(const DataPathServer&) = delete;

  // Closes the listener and every connection, and joins their threads. Idempotent.
  void Stop();

  uint16_t port() const { return port_; }
  // The version it speaks: 1 or 2 (Options::encrypt).
  uint32_t version() const;
  // What OpenDataPath hands `node_id` (the node the caller's certificate names): version 1, 16
  // random bytes new for every server, the same for every node; version 2, 32 bytes derived
  // from a secret new for every server and the node id (data_path_crypto.h).
  std::string SessionKeyFor(const std::string& node_id) const;
  // Version 1's key (SessionKeyFor any node).
  const std::string& session_key() const { return session_key_; }
  Stats stats() const;

 private:
  DataPathServer(FragmentStore* fragments, Options options)
      : fragments_(fragments), options_(std::move(options)) {}
  void AcceptLoop();
  void Serve(int fd);
  void JoinFinished();
  // The connection's hello (and, in version 2, its key check): OK, or why it is refused (and,
  // unless it is kCancelled, that is answered). Sets *ciphers in version 2.
  absl::Status Handshake(data_path_wire::Io& io, DataPathCiphers* ciphers);
  // Serves one request (its frame already read) on `io`, the connection's. false: the
  // connection must close.
  bool ServeRequest(const data_path_wire::Io& connection, const DataPathCiphers& ciphers,
                    const std::string& frame, std::vector<uint8_t>* scratch);

  FragmentStore* const fragments_;
  const Options options_;
  int listen_fd_ = -1;
  int stop_fd_ = -1;  // an eventfd: readable once Stop() was called
  uint16_t port_ = 0;
  std::string session_key_;  // version 1
  std::string secret_;       // version 2: session keys are derived from it
  std::thread accept_thread_;

  mutable absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::set<int> open_fds_ ABSL_GUARDED_BY(mu_);
  // One thread per open connection, by serial number; a finished one is joined by the accept
  // loop (or Stop).
  uint64_t next_serial_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<uint64_t, std::thread> threads_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> finished_ ABSL_GUARDED_BY(mu_);
  Stats stats_ ABSL_GUARDED_BY(mu_);
};

class DataPathClient {
 public:
  class Connection;  // one connection of the pool (data_path_client.cc)
  // Where a peer's data path listens, as its OpenDataPath answered.
  struct Endpoint {
    std::string host;  // of the peer's address
    uint16_t port = 0;
    std::string session_key;
    uint32_t version = kDataPathVersionPlain;  // 2: encrypted (Options::self_node_id's key)
  };

  struct Options {
    size_t chunk_bytes = kDefaultChunkBytes;  // PUT_RANGE chunks, and asked of GET_RANGE
    int max_idle_per_peer = 16;               // idle connections kept per peer
    // An idle connection older than this is closed instead of reused (well before the server's
    // idle_timeout, so a kept connection is never one the server is closing).
    absl::Duration max_idle_age = absl::Seconds(60);
    // This daemon's node id, named in every PUT_RANGE and SEAL (FragmentKey.owner_node_id) so
    // that a receiver can refuse the writes of a fenced incarnation, and in version 2 hellos
    // (the node whose session key the endpoint holds).
    std::string self_node_id;
  };

  explicit DataPathClient(Options options);
  ~DataPathClient();  // closes the idle connections

  // Stores bytes [begin, end) of a fragment, data being the whole fragment's memory. Returns the
  // fragment's status on the peer and the CRC32C of the range (*range_crc32c).
  absl::StatusOr<FragmentStatus> PutRange(const std::string& peer, const Endpoint& endpoint,
                                          const FragmentKey& key, const FragmentMeta& meta,
                                          const uint8_t* data, uint64_t begin, uint64_t end,
                                          absl::Time deadline, uint32_t* range_crc32c);
  // Seals a fragment whose ranges are all stored. Returns its sealed status.
  absl::StatusOr<FragmentStatus> Seal(const std::string& peer, const Endpoint& endpoint,
                                      const FragmentKey& key, const FragmentMeta& meta,
                                      uint32_t fragment_crc32c, absl::Time deadline);

  // What GetRange read: the fragment as sealed, and the range it covered.
  struct RangeRead {
    FragmentMeta meta;             // owner_incarnation as asked (0: any)
    uint32_t fragment_crc32c = 0;  // as sealed
    uint64_t begin = 0;
    uint64_t end = 0;
    uint32_t range_crc32c = 0;     // of the bytes received (0 for an empty range)
  };
  // Reads [begin, end) of a sealed fragment (end 0: to its end; both clamped to it) into
  // dst + offset, each chunk checked against its CRC32C. dst holds `capacity` bytes:
  // kInvalidArgument when the fragment is larger.
  absl::StatusOr<RangeRead> GetRange(const std::string& peer, const Endpoint& endpoint,
                                     const FragmentKey& key, uint64_t owner_incarnation,
                                     uint64_t begin, uint64_t end, uint8_t* dst, size_t capacity,
                                     absl::Time deadline);

  // Opens connections to the peer until `count` are idle in its pool (ahead of transfers).
  absl::Status Open(const std::string& peer, const Endpoint& endpoint, int count,
                    absl::Time deadline);

  // Closes the peer's idle connections (its daemon restarted: they lead nowhere).
  void Forget(const std::string& peer);

 private:
  absl::StatusOr<std::unique_ptr<Connection>> Acquire(const std::string& peer,
                                                      const Endpoint& endpoint,
                                                      absl::Time deadline);
  // Sends `request` on a connection to the peer, then send_body(io) (a PUT_RANGE's chunks, on
  // the connection's Io; may be empty), and reads the answer: its error, or the answer when it is
  // OK.
  absl::StatusOr<peer::DataPathResponse> Exchange(
      const std::string& peer, const Endpoint& endpoint, const peer::DataPathRequest& request,
      absl::Time deadline, const std::function<absl::Status(data_path_wire::Io& io)>& send_body);
  // A new connection that has said hello.
  absl::StatusOr<std::unique_ptr<Connection>> Connect(const std::string& peer,
                                                      const Endpoint& endpoint,
                                                      absl::Time deadline);
  // The hello of a new connection (version 2: and its keys).
  absl::Status Handshake(const std::string& peer, const Endpoint& endpoint, absl::Time deadline,
                         Connection* connection);
  // Keeps a connection whose last request completed in step for reuse.
  void Release(const std::string& peer, std::unique_ptr<Connection> connection);

  const Options options_;
  absl::Mutex mu_;
  std::map<std::string, std::vector<std::unique_ptr<Connection>>> idle_ ABSL_GUARDED_BY(mu_);
};

// The host part of "host:port" or "[v6]:port" (brackets removed).
std::string HostOfAddress(const std::string& address);

// Time the data path's threads spent waiting, summed over the process since it started: a
// sender for its records to be sealed on the cipher pool and for room in its socket, a receiver
// for its records to be opened there and for bytes in the middle of a range, a client for the
// answer to its request; and the longest single wait of each kind since
// ResetLongestDataPathWaits. For measurements (transfer_bench prints them).
struct DataPathWaits {
  uint64_t seal_ns = 0;
  uint64_t open_ns = 0;
  uint64_t send_ns = 0;
  uint64_t recv_ns = 0;
  uint64_t reply_ns = 0;
  uint64_t longest_seal_ns = 0;
  uint64_t longest_open_ns = 0;
  uint64_t longest_send_ns = 0;
  uint64_t longest_recv_ns = 0;
  uint64_t longest_reply_ns = 0;
};
DataPathWaits DataPathWaitTotals();
void ResetLongestDataPathWaits();

// The size of the records that an encrypted connection's sender has sealed on the cipher pool
// (256 KiB unless set), for measurements; clamped to 32 KiB..4 MiB. Receivers take records of
// any size.
void SetSealedRecordBytes(size_t bytes);
size_t SealedRecordBytes();

}  // namespace tessera

#endif  // TESSERA_DAEMON_TRANSFER_DATA_PATH_H_
