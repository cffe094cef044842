// The configuration of tesserad: one TOML file plus "key=value" overrides, loaded and validated
// once at start. Every key, with its documentation and default, is printed by
// DefaultDaemonConfigToml() (`tesserad --print-default-config`).
#ifndef TESSERA_DAEMON_DAEMON_CONFIG_H_
#define TESSERA_DAEMON_DAEMON_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace tessera {

// The validated configuration. A default-constructed DaemonConfig holds the defaults; the field
// comments name the TOML keys, whose documentation is in DefaultDaemonConfigToml().
struct DaemonConfig {
  struct Node {
    std::string id;  // node.id; empty: the host name
  };
  struct Store {
    std::string directory = "/dev/shm/tessera";  // store.directory
    int64_t capacity_bytes = 0;  // store.capacity_bytes; 0: half the free space at start
    bool prefault = true;        // store.prefault
    int crc_threads = 4;         // store.crc_threads
  };
  struct Agent {
    std::string socket_path = "/run/tessera/agent.sock";  // agent.socket_path
    uint32_t socket_mode = 0660;  // agent.socket_mode (written in octal in the file: "0660")
  };
  struct Daemon {
    int64_t drain_timeout_ms = 30000;  // daemon.drain_timeout_ms
  };
  struct Log {
    std::string level = "info";  // log.level
  };

  Node node;
  Store store;
  Agent agent;
  Daemon daemon;
  Log log;
};

// Loads the TOML file at `path_or_empty` (no file when empty: defaults), then applies each
// "key=value" of `overrides` in order, so an override wins over the file.
// Errors: kInvalidArgument listing every problem (unknown key, wrong type, invalid value,
// malformed override, TOML syntax error), each naming the file and line or the override, the
// key, and what is valid; kNotFound and other errno codes when the file cannot be read.
absl::StatusOr<DaemonConfig> LoadDaemonConfig(const std::string& path_or_empty,
                                              const std::vector<std::string>& overrides);

// Every key as a commented TOML file set to its default; loading it yields DaemonConfig{}.
std::string DefaultDaemonConfigToml();

}  // namespace tessera

#endif  // TESSERA_DAEMON_DAEMON_CONFIG_H_
