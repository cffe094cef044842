#include "common/logging.h"

#include <mutex>

#include "spdlog/sinks/stdout_sinks.h"

namespace tessera {
namespace {

std::mutex& LoggerMutex() {
  static std::mutex mu;
  return mu;
}

}  // namespace

std::shared_ptr<spdlog::logger> Logger(const std::string& component) {
  std::lock_guard<std::mutex> lock(LoggerMutex());
  if (auto existing = spdlog::get(component)) return existing;
  auto logger = spdlog::stderr_logger_mt(component);
  logger->set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%L%$ %P [%n] %v");
  logger->set_level(spdlog::get_level());
  return logger;
}

absl::Status SetLogLevel(const std::string& level) {
  for (const char* name : {"trace", "debug", "info", "warn", "error", "critical", "off"}) {
    if (level == name) {
      spdlog::set_level(spdlog::level::from_str(level));
      return absl::OkStatus();
    }
  }
  return absl::InvalidArgumentError(
      "log level '" + level + "' is not one of trace, debug, info, warn, error, critical, off");
}

}  // namespace tessera
