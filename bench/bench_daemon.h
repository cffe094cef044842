// A tesserad of a benchmark's own: a fresh directory under /dev/shm holds its store, socket and
// log; it never outlives the benchmark (PR_SET_PDEATHSIG) and is stopped with SIGTERM and removed
// on destruction.
#ifndef TESSERA_BENCH_BENCH_DAEMON_H_
#define TESSERA_BENCH_BENCH_DAEMON_H_

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace tessera {

class BenchDaemon {
 public:
  // Starts `binary` as node `name` and waits (up to 20 s) until its agent socket answers;
  // kUnavailable with the log's tail otherwise. `settings` are more "key=value" overrides (peer
  // and cluster keys for a daemon of a loopback cluster).
  static absl::StatusOr<std::unique_ptr<BenchDaemon>> Start(
      const std::string& binary, const std::string& name, uint64_t capacity_bytes, int crc_threads,
      const std::vector<std::string>& settings = {});
  ~BenchDaemon();

  const std::string& dir() const { return dir_; }
  const std::string& socket_path() const { return socket_path_; }
  std::string LogTail() const;
  std::string Log() const;  // the whole log

 private:
  explicit BenchDaemon(std::string dir);
  bool Answers() const;

  std::string dir_, socket_path_;
  pid_t pid_ = -1;
};

}  // namespace tessera

#endif  // TESSERA_BENCH_BENCH_DAEMON_H_
