#include "common/log_capture.h"

#include <algorithm>

#include "common/logging.h"

namespace tessera {

LogCapture::LogCapture(const std::string& component, size_t max_lines)
    : component_(component), sink_(std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(max_lines)) {
  sink_->set_pattern("%v");
  Logger(component_)->sinks().push_back(sink_);
}

LogCapture::~LogCapture() {
  auto& sinks = Logger(component_)->sinks();
  sinks.erase(std::remove(sinks.begin(), sinks.end(), sink_), sinks.end());
}

std::vector<std::string> LogCapture::Lines() const { return sink_->last_formatted(); }

size_t LogCapture::Count(const std::string& needle) const {
  const std::vector<std::string> lines = Lines();
  return std::count_if(lines.begin(), lines.end(), [&](const std::string& line) {
    return line.find(needle) != std::string::npos;
  });
}

}  // namespace tessera
