// Test only: the lines one component's logger (common/logging.h) writes while a LogCapture
// lives, so that a test can check what was logged and how often. Not thread-safe against other
// LogCaptures of the same component; the logger itself may be used from any thread meanwhile.
#ifndef TESSERA_COMMON_LOG_CAPTURE_H_
#define TESSERA_COMMON_LOG_CAPTURE_H_

#include <memory>
#include <string>
#include <vector>

#include "spdlog/sinks/ringbuffer_sink.h"

namespace tessera {

class LogCapture {
 public:
  explicit LogCapture(const std::string& component, size_t max_lines = 100000);
  ~LogCapture();  // detaches from the logger
  LogCapture(const LogCapture&) = delete;
  LogCapture& operator=(const LogCapture&) = delete;

  // Every line written so far (at most max_lines, the newest), as formatted.
  std::vector<std::string> Lines() const;
  // How many of them contain `needle`.
  size_t Count(const std::string& needle) const;

 private:
  const std::string component_;
  std::shared_ptr<spdlog::sinks::ringbuffer_sink_mt> sink_;
};

}  // namespace tessera

#endif  // TESSERA_COMMON_LOG_CAPTURE_H_
