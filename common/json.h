// A JSON value built in code and written out with its object keys in insertion order: the CLI's
// --json output and the C ABI's snapshot manifests. Writing only: tests read the output with
// protobuf's JSON parser or Python's json module. Strings are written byte for byte (control
// characters escaped): give them valid UTF-8.
#ifndef TESSERA_COMMON_JSON_H_
#define TESSERA_COMMON_JSON_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace tessera {

class Json {
 public:
  Json() : kind_(Kind::kNull) {}  // null
  Json(bool b) : kind_(Kind::kLiteral), text_(b ? "true" : "false") {}
  Json(int v) : Json(static_cast<int64_t>(v)) {}
  Json(long v) : kind_(Kind::kLiteral), text_(std::to_string(v)) {}
  Json(long long v) : kind_(Kind::kLiteral), text_(std::to_string(v)) {}
  Json(unsigned v) : Json(static_cast<uint64_t>(v)) {}
  Json(unsigned long v) : kind_(Kind::kLiteral), text_(std::to_string(v)) {}
  Json(unsigned long long v) : kind_(Kind::kLiteral), text_(std::to_string(v)) {}
  Json(double v);  // NaN and infinities become null
  Json(const char* s) : kind_(Kind::kString), text_(s) {}
  Json(std::string s) : kind_(Kind::kString), text_(std::move(s)) {}

  static Json Object() { return Json(Kind::kObject); }
  static Json Array() { return Json(Kind::kArray); }
  template <typename T>
  static Json ArrayOf(const T& values) {
    Json array = Array();
    for (const auto& v : values) array.Add(Json(v));
    return array;
  }

  // REQUIRES: an object. Adds `key`, or replaces its value if present.
  Json& Set(const std::string& key, Json value);
  // REQUIRES: an array.
  Json& Add(Json value);

  // Indented by two spaces per level, ending without a newline.
  std::string Dump() const;

 private:
  enum class Kind { kNull, kLiteral, kString, kObject, kArray };
  explicit Json(Kind kind) : kind_(kind) {}
  void DumpTo(std::string* out, int depth) const;

  Kind kind_;
  std::string text_;                                   // literal text, or the string
  std::vector<std::pair<std::string, Json>> members_;  // object
  std::vector<Json> elements_;                         // array
};

// `s` as a JSON string literal, quotes included: control characters and DEL escaped, so that it
// is also a TOML basic string.
std::string JsonQuote(std::string_view s);

}  // namespace tessera

#endif  // TESSERA_COMMON_JSON_H_
