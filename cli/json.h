// A JSON value built in code and written out with its object keys in insertion order, for the
// CLI's --json output. Writing only: tests read the output with protobuf's JSON parser.
#ifndef TESSERA_CLI_JSON_H_
#define TESSERA_CLI_JSON_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace tessera::cli {

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

// `s` as a JSON string literal, quotes included.
std::string JsonQuote(const std::string& s);

}  // namespace tessera::cli

#endif  // TESSERA_CLI_JSON_H_
