#include "common/json.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"

namespace tessera {
namespace {

TEST(JsonTest, KeepsInsertionOrderAndEscapes) {
  Json j = Json::Object();
  j.Set("b", 1);
  j.Set("a", "x\"y\\z\n\x01");
  j.Set("list", Json::ArrayOf(std::vector<int>{1, 2}));
  j.Set("empty", Json::Array());
  j.Set("none", Json());
  j.Set("big", uint64_t{18446744073709551615ull});
  j.Set("neg", int64_t{-5});
  j.Set("yes", true);
  j.Set("b", 2);  // replaced in place
  EXPECT_EQ(j.Dump(),
            "{\n"
            "  \"b\": 2,\n"
            "  \"a\": \"x\\\"y\\\\z\\n\\u0001\",\n"
            "  \"list\": [\n    1,\n    2\n  ],\n"
            "  \"empty\": [],\n"
            "  \"none\": null,\n"
            "  \"big\": 18446744073709551615,\n"
            "  \"neg\": -5,\n"
            "  \"yes\": true\n"
            "}");
}

TEST(JsonTest, ControlCharactersAndDelAreEscapedAndUtf8KeptAsIs) {
  EXPECT_EQ(JsonQuote(std::string("\b\f\r\t\x1f\x7f\0 \xc3\xbc", 10)),
            "\"\\b\\f\\r\\t\\u001f\\u007f\\u0000 \xc3\xbc\"");
}

TEST(JsonTest, NumbersThatJsonCannotHoldAreNull) {
  EXPECT_EQ(Json(std::nan("")).Dump(), "null");
  EXPECT_EQ(Json(INFINITY).Dump(), "null");
  EXPECT_EQ(Json(1.5e-14).Dump(), "1.5e-14");
}

}  // namespace
}  // namespace tessera
