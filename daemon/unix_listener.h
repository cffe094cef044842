// Serves a grpc::Server on a Unix socket whose connections we accept ourselves, so that each
// connection's SO_PEERCRED (uid, gid, pid) is known. gRPC names a connection handed over by file
// descriptor "fd:<n>" (ServerContext::peer()); PeerCredentials maps that name to the caller.
#ifndef TESSERA_DAEMON_UNIX_LISTENER_H_
#define TESSERA_DAEMON_UNIX_LISTENER_H_

#include <sys/types.h>

#include <atomic>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "daemon/store/snapshot_store.h"
#include "grpcpp/server.h"

namespace tessera {

// Thread-safe map from a gRPC peer string to the credentials of the process behind it.
class PeerCredentials {
 public:
  void Record(int fd, const Caller& caller);
  // Connections of `uid` still open: entries whose descriptor was closed (or now names another
  // file) are dropped first, and connections whose client hung up are not counted.
  int CountOpen(uid_t uid);
  // The caller behind `peer` ("fd:<n>"), or nullopt for any other kind of peer.
  std::optional<Caller> Lookup(const std::string& peer) const;

 private:
  mutable absl::Mutex mu_;
  struct Entry {
    Caller caller;
    ino_t inode;  // of the socket, to tell a reused descriptor number from the same connection
  };
  std::map<int, Entry> by_fd_ ABSL_GUARDED_BY(mu_);
};

class UnixListener {
 public:
  // Binds `path` (creating its parent directory; replacing a stale socket file, but refusing one
  // that another process still serves), sets `mode`, and hands every accepted connection to
  // `server`, which must already be started and must outlive the listener. A connection whose
  // uid already holds `max_per_uid` open ones is closed at once (0: no limit).
  static absl::StatusOr<std::unique_ptr<UnixListener>> Start(const std::string& path, mode_t mode,
                                                             grpc::Server* server,
                                                             PeerCredentials* credentials,
                                                             int max_per_uid = 0);
  // Stops accepting and removes the socket file. Existing connections stay with the server.
  ~UnixListener();

 private:
  UnixListener(std::string path, int listen_fd, int stop_fd, grpc::Server* server,
               PeerCredentials* credentials, int max_per_uid);
  // Logs, at most once per 10 s per uid, a connection closed for its uid's cap.
  void NoteOverCap(uid_t uid, pid_t pid, int open);
  void AcceptLoop();

  // Out of file descriptors: takes the pending connection with the spare descriptor and closes
  // it, so that the listening socket does not stay readable and the loop does not spin.
  void Shed(int accept_errno);

  const std::string path_;
  const int listen_fd_;
  const int stop_fd_;  // eventfd that wakes the accept loop for shutdown
  grpc::Server* const server_;
  PeerCredentials* const credentials_;
  const int max_per_uid_;
  std::map<uid_t, int64_t> over_cap_logged_at_ns_;  // accept thread only
  int spare_fd_ = -1;               // /dev/null, given up to take a connection to shed
  uint64_t shed_ = 0;               // connections shed since start
  uint64_t shed_logged_ = 0;        // shed_ at the last log line
  int64_t shed_logged_at_ns_ = 0;   // when that line was written
  std::thread thread_;
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_UNIX_LISTENER_H_
