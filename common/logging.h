// Logging through spdlog: one named logger per component ("store", "agent-service", "peer", ...),
// all writing to stderr with the same pattern, created on first use. Thread-safe.
#ifndef TESSERA_COMMON_LOGGING_H_
#define TESSERA_COMMON_LOGGING_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "spdlog/spdlog.h"

namespace tessera {

// Returns the logger for `component`, creating it at the current global level if needed.
std::shared_ptr<spdlog::logger> Logger(const std::string& component);

// Sets the level of every logger, existing and future. `level` is one of
// trace, debug, info, warn, error, critical, off; anything else is kInvalidArgument.
absl::Status SetLogLevel(const std::string& level);

}  // namespace tessera

#endif  // TESSERA_COMMON_LOGGING_H_
