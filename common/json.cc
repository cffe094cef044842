#include "common/json.h"

#include <cmath>
#include <cstdio>

namespace tessera {

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

std::string JsonQuote(std::string_view s) {
  std::string out = "\"";
  for (char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\f':
        out += "\\f";
        break;
      case '\r':
        out += "\\r";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", static_cast<unsigned char>(c));
          out += buf;
        } else {
          out += c;
        }
    }
  }
  out += '"';
  return out;
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

}  // namespace tessera
