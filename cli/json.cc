#include "cli/json.h"

#include <cmath>
#include <cstdio>

namespace tessera::cli {

Json::Json(double v) : kind_(Kind::kLiteral) {
  if (!std::isfinite(v)) {
    kind_ = Kind::kNull;
    return;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.9g", v);
  text_ = buf;
}

Json& Json::Set(const std::string& key, Json value) {
  for (auto& [k, v] : members_) {
    if (k == key) {
      v = std::move(value);
      return *this;
    }
  }
  members_.emplace_back(key, std::move(value));
  return *this;
}

Json& Json::Add(Json value) {
  elements_.push_back(std::move(value));
  return *this;
}

std::string JsonQuote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

std::string Json::Dump() const {
  std::string out;
  DumpTo(&out, 0);
  return out;
}

void Json::DumpTo(std::string* out, int depth) const {
  const std::string indent(2 * (depth + 1), ' ');
  const std::string closing(2 * depth, ' ');
  switch (kind_) {
    case Kind::kNull:
      *out += "null";
      return;
    case Kind::kLiteral:
      *out += text_;
      return;
    case Kind::kString:
      *out += JsonQuote(text_);
      return;
    case Kind::kObject:
      if (members_.empty()) {
        *out += "{}";
        return;
      }
      *out += "{\n";
      for (size_t i = 0; i < members_.size(); ++i) {
        *out += indent + JsonQuote(members_[i].first) + ": ";
        members_[i].second.DumpTo(out, depth + 1);
        *out += i + 1 < members_.size() ? ",\n" : "\n";
      }
      *out += closing + "}";
      return;
    case Kind::kArray:
      if (elements_.empty()) {
        *out += "[]";
        return;
      }
      *out += "[\n";
      for (size_t i = 0; i < elements_.size(); ++i) {
        *out += indent;
        elements_[i].DumpTo(out, depth + 1);
        *out += i + 1 < elements_.size() ? ",\n" : "\n";
      }
      *out += closing + "]";
      return;
  }
}

}  // namespace tessera::cli
