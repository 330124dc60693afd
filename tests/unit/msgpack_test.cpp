#include "ehrgate/msgpack.hpp"

#include <gtest/gtest.h>

#define MSGPACK_NO_BOOST
#include <msgpack.hpp>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <ostream>
#include <random>
#include <string>
#include <tuple>
#include <vector>

namespace ehrgate::msgpack {
namespace {

// ---- Helpers ---------------------------------------------------------------------------------

std::string hex(std::string_view bytes) {
    static constexpr char kHex[] = "0123456789abcdef";
    std::string out;
    for (const char ch : bytes) {
        const auto b = static_cast<uint8_t>(ch);
        out.push_back(kHex[b >> 4]);
        out.push_back(kHex[b & 0xf]);
    }
    return out;
}

std::string unhex(std::string_view text) {
    auto nibble = [](char c) { return c <= '9' ? c - '0' : c - 'a' + 10; };
    std::string out;
    for (size_t i = 0; i + 1 < text.size(); i += 2) {
        out.push_back(static_cast<char>(nibble(text[i]) << 4 | nibble(text[i + 1])));
    }
    return out;
}

std::string written(const std::function<void(Writer &)> &write) {
    std::string out;
    Writer w(out);
    write(w);
    return out;
}

// A heap copy of exactly `bytes.size()` bytes, so that AddressSanitizer reports any read past the
// end (a std::string would hide it behind its capacity and terminating NUL).
class ExactBuffer {
  public:
    explicit ExactBuffer(std::string_view bytes)
        : data_(bytes.empty() ? nullptr : new char[bytes.size()]), size_(bytes.size()) {
        std::copy(bytes.begin(), bytes.end(), data_.get());
    }
    std::string_view view() const { return {data_.get(), size_}; }

  private:
    std::unique_ptr<char[]> data_;
    size_t size_;
};

// A decoded MessagePack value, in a form both codecs can be compared on. Integers are
// normalized: every non-negative value is UInt, only negative values are Int. Map entries are
// stored as alternating keys and values in `items`.
struct Value {
    enum class Kind { Nil, Bool, UInt, Int, Str, Bin, Array, Map };
    Kind kind = Kind::Nil;
    bool b = false;
    uint64_t u = 0;
    int64_t i = 0;
    std::string bytes;
    std::vector<Value> items;

    bool operator==(const Value &) const = default;
};

void PrintTo(const Value &v, std::ostream *os) {
    static constexpr const char *kNames[] = {"nil", "bool", "uint",  "int",
                                             "str", "bin",  "array", "map"};
    *os << kNames[static_cast<int>(v.kind)];
    switch (v.kind) {
        case Value::Kind::Bool:
            *os << '(' << v.b << ')';
            break;
        case Value::Kind::UInt:
            *os << '(' << v.u << ')';
            break;
        case Value::Kind::Int:
            *os << '(' << v.i << ')';
            break;
        case Value::Kind::Str:
        case Value::Kind::Bin:
            *os << '[' << v.bytes.size() << ']';
            break;
        case Value::Kind::Array:
        case Value::Kind::Map:
            *os << '{';
            for (const Value &item : v.items) {
                PrintTo(item, os);
                *os << ' ';
            }
            *os << '}';
            break;
        case Value::Kind::Nil:
            break;
    }
}

Value make_uint(uint64_t v) {
    Value out;
    out.kind = Value::Kind::UInt;
    out.u = v;
    return out;
}
Value make_int(int64_t v) {
    if (v >= 0) {
        return make_uint(static_cast<uint64_t>(v));
    }
    Value out;
    out.kind = Value::Kind::Int;
    out.i = v;
    return out;
}
Value make_str(std::string s) {
    Value out;
    out.kind = Value::Kind::Str;
    out.bytes = std::move(s);
    return out;
}
Value make_bin(std::string s) {
    Value out;
    out.kind = Value::Kind::Bin;
    out.bytes = std::move(s);
    return out;
}
Value make_bool(bool b) {
    Value out;
    out.kind = Value::Kind::Bool;
    out.b = b;
    return out;
}
Value make_container(Value::Kind kind) {
    Value out;
    out.kind = kind;
    return out;
}

void write_value(Writer &w, const Value &v) {
    switch (v.kind) {
        case Value::Kind::Nil:
            w.nil();
            break;
        case Value::Kind::Bool:
            w.boolean(v.b);
            break;
        case Value::Kind::UInt:
            w.uint(v.u);
            break;
        case Value::Kind::Int:
            w.sint(v.i);
            break;
        case Value::Kind::Str:
            w.str(v.bytes);
            break;
        case Value::Kind::Bin:
            w.bin(v.bytes);
            break;
        case Value::Kind::Array:
            w.array(static_cast<uint32_t>(v.items.size()));
            for (const Value &item : v.items) {
                write_value(w, item);
            }
            break;
        case Value::Kind::Map:
            w.map(static_cast<uint32_t>(v.items.size() / 2));
            for (const Value &item : v.items) {
                write_value(w, item);
            }
            break;
    }
}

std::string encode_value(const Value &v) {
    std::string out;
    Writer w(out);
    write_value(w, v);
    return out;
}

// Reads one value with the typed read_* calls, dispatching on peek_type(). Float and Ext have no
// typed reader, so they are reported as failures here.
std::optional<Value> read_value(Reader &r) {
    Value v;
    switch (r.peek_type()) {
        case Type::Nil:
            if (!r.read_nil()) {
                return std::nullopt;
            }
            return v;
        case Type::Bool: {
            const std::optional<bool> b = r.read_bool();
            if (!b) {
                return std::nullopt;
            }
            v.kind = Value::Kind::Bool;
            v.b = *b;
            return v;
        }
        case Type::UInt: {
            const std::optional<uint64_t> u = r.read_uint();
            if (!u) {
                return std::nullopt;
            }
            return make_uint(*u);
        }
        case Type::Int: {
            const std::optional<int64_t> i = r.read_int();
            if (!i) {
                return std::nullopt;
            }
            return make_int(*i);
        }
        case Type::Str: {
            const std::optional<std::string_view> s = r.read_str();
            if (!s) {
                return std::nullopt;
            }
            return make_str(std::string(*s));
        }
        case Type::Bin: {
            const std::optional<std::string_view> s = r.read_bin();
            if (!s) {
                return std::nullopt;
            }
            return make_bin(std::string(*s));
        }
        case Type::Array:
        case Type::Map: {
            const bool is_map = r.peek_type() == Type::Map;
            const std::optional<uint32_t> n = is_map ? r.read_map() : r.read_array();
            if (!n) {
                return std::nullopt;
            }
            v.kind = is_map ? Value::Kind::Map : Value::Kind::Array;
            const uint64_t items = is_map ? uint64_t{*n} * 2 : *n;
            for (uint64_t k = 0; k < items; ++k) {
                std::optional<Value> item = read_value(r);
                if (!item) {
                    return std::nullopt;
                }
                v.items.push_back(std::move(*item));
            }
            return v;
        }
        case Type::Float:
        case Type::Ext:
        case Type::Invalid:
            break;
    }
    r.fail();
    return std::nullopt;
}

// Decodes `bytes` as exactly one value.
std::optional<Value> decode_value(std::string_view bytes) {
    Reader r(bytes);
    std::optional<Value> v = read_value(r);
    if (!v || !r.ok() || !r.at_end()) {
        return std::nullopt;
    }
    return v;
}

// ---- Golden bytes ----------------------------------------------------------------------------

struct Golden {
    std::string hex;
    Value value;
};

TEST(MsgpackWriter, UnsignedWidthBoundaries) {
    const std::vector<Golden> cases = {
        {"00", make_uint(0)},
        {"01", make_uint(1)},
        {"7f", make_uint(0x7f)},
        {"cc80", make_uint(0x80)},
        {"ccff", make_uint(0xff)},
        {"cd0100", make_uint(0x100)},
        {"cdffff", make_uint(0xffff)},
        {"ce00010000", make_uint(0x10000)},
        {"ceffffffff", make_uint(0xffffffff)},
        {"cf0000000100000000", make_uint(0x100000000)},
        {"cf7fffffffffffffff", make_uint(std::numeric_limits<int64_t>::max())},
        {"cf8000000000000000", make_uint(uint64_t{1} << 63)},
        {"cfffffffffffffffff", make_uint(std::numeric_limits<uint64_t>::max())},
    };
    for (const Golden &c : cases) {
        SCOPED_TRACE(c.hex);
        EXPECT_EQ(hex(written([&](Writer &w) { w.uint(c.value.u); })), c.hex);
        EXPECT_EQ(decode_value(unhex(c.hex)), c.value);
    }
}

TEST(MsgpackWriter, SignedWidthBoundaries) {
    const std::vector<std::pair<std::string, int64_t>> cases = {
        // Non-negative values take the unsigned encodings.
        {"00", 0},
        {"7f", 127},
        {"cc80", 128},
        {"cdffff", 65535},
        {"cf7fffffffffffffff", std::numeric_limits<int64_t>::max()},
        // Negative fixint, then int8..int64.
        {"ff", -1},
        {"e0", -32},
        {"d0df", -33},
        {"d080", -128},
        {"d1ff7f", -129},
        {"d18000", -32768},
        {"d2ffff7fff", -32769},
        {"d280000000", std::numeric_limits<int32_t>::min()},
        {"d3ffffffff7fffffff", int64_t{std::numeric_limits<int32_t>::min()} - 1},
        {"d38000000000000000", std::numeric_limits<int64_t>::min()},
    };
    for (const auto &[expected, value] : cases) {
        SCOPED_TRACE(expected);
        EXPECT_EQ(hex(written([&](Writer &w) { w.sint(value); })), expected);
        EXPECT_EQ(decode_value(unhex(expected)), make_int(value));
        const std::string bytes = unhex(expected);
        Reader r(bytes);
        EXPECT_EQ(r.read_int(), value);
        EXPECT_TRUE(r.at_end());
    }
}

TEST(MsgpackWriter, NilAndBooleans) {
    EXPECT_EQ(hex(written([](Writer &w) { w.nil(); })), "c0");
    EXPECT_EQ(hex(written([](Writer &w) { w.boolean(false); })), "c2");
    EXPECT_EQ(hex(written([](Writer &w) { w.boolean(true); })), "c3");

    const std::string bytes = unhex("c0c2c3");
    Reader r(bytes);
    EXPECT_TRUE(r.read_nil());
    EXPECT_EQ(r.read_bool(), false);
    EXPECT_EQ(r.read_bool(), true);
    EXPECT_TRUE(r.ok());
    EXPECT_TRUE(r.at_end());
}

// Encodes a string or bin of `length` bytes and checks the header and the payload that follows.
void expect_sized(bool is_bin, size_t length, std::string_view header_hex) {
    SCOPED_TRACE((is_bin ? "bin of " : "str of ") + std::to_string(length));
    std::string payload(length, '\0');
    for (size_t i = 0; i < length; ++i) {
        payload[i] = static_cast<char>('a' + i % 26);
    }
    const std::string out = written([&](Writer &w) { is_bin ? w.bin(payload) : w.str(payload); });
    const std::string header = unhex(header_hex);
    ASSERT_EQ(out.size(), header.size() + length);
    EXPECT_EQ(hex(out.substr(0, header.size())), header_hex);
    EXPECT_TRUE(out.compare(header.size(), length, payload) == 0);

    Reader r(out);
    const std::optional<std::string_view> back = is_bin ? r.read_bin() : r.read_str();
    ASSERT_TRUE(back.has_value());
    EXPECT_TRUE(*back == payload);
    EXPECT_TRUE(r.at_end());
}

TEST(MsgpackWriter, StringWidthBoundaries) {
    expect_sized(false, 0, "a0");
    expect_sized(false, 1, "a1");
    expect_sized(false, 31, "bf");
    expect_sized(false, 32, "d920");
    expect_sized(false, 255, "d9ff");
    expect_sized(false, 256, "da0100");
    expect_sized(false, 65535, "daffff");
    expect_sized(false, 65536, "db00010000");
    EXPECT_EQ(hex(written([](Writer &w) { w.str("hi"); })), "a26869");
}

TEST(MsgpackWriter, BinWidthBoundaries) {
    // bin has no "fix" form: even the empty bin takes bin8.
    expect_sized(true, 0, "c400");
    expect_sized(true, 1, "c401");
    expect_sized(true, 255, "c4ff");
    expect_sized(true, 256, "c50100");
    expect_sized(true, 65535, "c5ffff");
    expect_sized(true, 65536, "c600010000");
    EXPECT_EQ(hex(written([](Writer &w) { w.bin(std::string("\0\xff", 2)); })), "c40200ff");
}

TEST(MsgpackWriter, ContainerHeaderWidthBoundaries) {
    const std::vector<std::tuple<uint32_t, std::string, std::string>> cases = {
        {0, "90", "80"},
        {1, "91", "81"},
        {15, "9f", "8f"},
        {16, "dc0010", "de0010"},
        {0xffff, "dcffff", "deffff"},
        {0x10000, "dd00010000", "df00010000"},
        {0xffffffff, "ddffffffff", "dfffffffff"},
    };
    for (const auto &[count, array_hex, map_hex] : cases) {
        SCOPED_TRACE(count);
        EXPECT_EQ(hex(written([&](Writer &w) { w.array(count); })), array_hex);
        EXPECT_EQ(hex(written([&](Writer &w) { w.map(count); })), map_hex);
        const std::string arrays_bytes = unhex(array_hex);
        Reader arrays(arrays_bytes);
        EXPECT_EQ(arrays.read_array(), count);
        EXPECT_TRUE(arrays.at_end());
        const std::string maps_bytes = unhex(map_hex);
        Reader maps(maps_bytes);
        EXPECT_EQ(maps.read_map(), count);
        EXPECT_TRUE(maps.at_end());
    }
}

TEST(MsgpackWriter, AppendsToTheCallersBuffer) {
    std::string out = "prefix";
    Writer w(out);
    w.map(1);
    w.key("k");
    w.uint(300);
    EXPECT_EQ(out, "prefix" + unhex("81a16bcd012c"));
}

// ---- Reader ----------------------------------------------------------------------------------

TEST(MsgpackReader, PeekTypeOfEveryMarkerByte) {
    for (int b = 0; b <= 0xff; ++b) {
        Type expected;
        if (b <= 0x7f || (b >= 0xcc && b <= 0xcf)) {
            expected = Type::UInt;
        } else if (b <= 0x8f || b == 0xde || b == 0xdf) {
            expected = Type::Map;
        } else if (b <= 0x9f || b == 0xdc || b == 0xdd) {
            expected = Type::Array;
        } else if (b <= 0xbf || (b >= 0xd9 && b <= 0xdb)) {
            expected = Type::Str;
        } else if (b >= 0xe0 || (b >= 0xd0 && b <= 0xd3)) {
            expected = Type::Int;
        } else if (b == 0xc0) {
            expected = Type::Nil;
        } else if (b == 0xc2 || b == 0xc3) {
            expected = Type::Bool;
        } else if (b >= 0xc4 && b <= 0xc6) {
            expected = Type::Bin;
        } else if (b == 0xca || b == 0xcb) {
            expected = Type::Float;
        } else if ((b >= 0xc7 && b <= 0xc9) || (b >= 0xd4 && b <= 0xd8)) {
            expected = Type::Ext;
        } else {
            ASSERT_EQ(b, 0xc1);
            expected = Type::Invalid;
        }
        const std::string byte(1, static_cast<char>(b));
        EXPECT_EQ(Reader(byte).peek_type(), expected) << "marker 0x" << hex(byte);
    }
    Reader empty("");
    EXPECT_EQ(empty.peek_type(), Type::Invalid);
    EXPECT_TRUE(empty.ok());  // peeking at the end is not an error by itself
}

TEST(MsgpackReader, AcceptsNonCanonicalEncodings) {
    // The writer is canonical; the reader is lenient about widths, as the spec allows.
    EXPECT_EQ(Reader(unhex("cc05")).read_uint(), 5u);
    EXPECT_EQ(Reader(unhex("cf0000000000000005")).read_uint(), 5u);
    EXPECT_EQ(Reader(unhex("d005")).read_uint(), 5u);
    EXPECT_EQ(Reader(unhex("d30000000000000005")).read_uint(), 5u);
    EXPECT_EQ(Reader(unhex("d1ffff")).read_int(), -1);
    EXPECT_EQ(Reader(unhex("d90161")).read_str(), "a");
    EXPECT_EQ(Reader(unhex("dc0000")).read_array(), 0u);
    EXPECT_EQ(Reader(unhex("df00000000")).read_map(), 0u);
}

TEST(MsgpackReader, IntegerRangeChecks) {
    // uint64 above INT64_MAX: a uint, never an int.
    EXPECT_EQ(Reader(unhex("cfffffffffffffffff")).read_uint(), UINT64_MAX);
    const std::string too_big_bytes = unhex("cf8000000000000000");
    Reader too_big(too_big_bytes);
    EXPECT_EQ(too_big.read_int(), std::nullopt);
    EXPECT_FALSE(too_big.ok());
    EXPECT_EQ(Reader(unhex("cf7fffffffffffffff")).read_int(), INT64_MAX);
    EXPECT_EQ(Reader(unhex("ceffffffff")).read_int(), int64_t{0xffffffff});
    // Negative values are not uints, whatever their width.
    for (const char *negative :
         {"ff", "e0", "d0ff", "d1ffff", "d2ffffffff", "d3ffffffffffffffff"}) {
        SCOPED_TRACE(negative);
        const std::string bytes = unhex(negative);
        Reader r(bytes);
        EXPECT_EQ(r.read_uint(), std::nullopt);
        EXPECT_FALSE(r.ok());
    }
}

// Every value kind with its canonical encoding, for the type-mismatch matrix.
enum class Read { Nil, Bool, UInt, Int, Str, Bin, Array, Map };

bool try_read(Reader &r, Read what) {
    switch (what) {
        case Read::Nil:
            return r.read_nil();
        case Read::Bool:
            return r.read_bool().has_value();
        case Read::UInt:
            return r.read_uint().has_value();
        case Read::Int:
            return r.read_int().has_value();
        case Read::Str:
            return r.read_str().has_value();
        case Read::Bin:
            return r.read_bin().has_value();
        case Read::Array:
            return r.read_array().has_value();
        case Read::Map:
            return r.read_map().has_value();
    }
    return false;
}

TEST(MsgpackReader, WrongTypeReadsFailAndStayFailed) {
    struct Sample {
        const char *hex;
        std::vector<Read> accepted_by;
    };
    const std::vector<Sample> samples = {
        {"c0", {Read::Nil}},
        {"c3", {Read::Bool}},
        {"05", {Read::UInt, Read::Int}},
        {"cd0100", {Read::UInt, Read::Int}},
        {"cfffffffffffffffff", {Read::UInt}},
        {"ff", {Read::Int}},
        {"d3ffffffffffffffff", {Read::Int}},
        {"a161", {Read::Str}},
        {"d90161", {Read::Str}},
        {"c40161", {Read::Bin}},
        {"91c0", {Read::Array}},
        {"81c0c0", {Read::Map}},
        {"ca3f800000", {}},
        {"cb3ff0000000000000", {}},
        {"d40100", {}},
        {"c1", {}},
    };
    const Read all[] = {Read::Nil, Read::Bool, Read::UInt,  Read::Int,
                        Read::Str, Read::Bin,  Read::Array, Read::Map};
    for (const Sample &sample : samples) {
        const std::string bytes = unhex(sample.hex);
        const std::string twice = bytes + bytes;
        for (const Read what : all) {
            SCOPED_TRACE(std::string(sample.hex) + " read as " +
                         std::to_string(static_cast<int>(what)));
            const bool accepted = std::find(sample.accepted_by.begin(), sample.accepted_by.end(),
                                            what) != sample.accepted_by.end();
            Reader r(twice);
            EXPECT_EQ(try_read(r, what), accepted);
            EXPECT_EQ(r.ok(), accepted);
            if (accepted) {
                continue;
            }
            // Sticky: the sample follows again, valid for the right reader, but every read now
            // fails and the position does not move. (A range failure such as a negative int read
            // as uint may already have consumed the first value; that is fine.)
            const size_t failed_at = r.position();
            EXPECT_TRUE(failed_at == 0 || failed_at == bytes.size()) << failed_at;
            EXPECT_EQ(r.peek_type(), Type::Invalid);
            for (const Read again : all) {
                EXPECT_FALSE(try_read(r, again));
            }
            EXPECT_FALSE(r.skip());
            EXPECT_FALSE(r.ok());
            EXPECT_EQ(r.position(), failed_at);
        }
    }
}

TEST(MsgpackReader, FailIsSticky) {
    const std::string bytes = unhex("c0c0");
    Reader r(bytes);
    EXPECT_TRUE(r.read_nil());
    r.fail();
    EXPECT_FALSE(r.ok());
    EXPECT_FALSE(r.read_nil());
    EXPECT_EQ(r.position(), 1u);
}

TEST(MsgpackReader, ReadingPastTheEndFails) {
    const std::string bytes = unhex("c0");
    Reader r(bytes);
    EXPECT_TRUE(r.read_nil());
    EXPECT_TRUE(r.at_end());
    EXPECT_TRUE(r.ok());
    EXPECT_FALSE(r.read_nil());
    EXPECT_FALSE(r.ok());
    EXPECT_FALSE(Reader("").skip());
}

// One value of every kind and width, nested, as a target for truncation.
Value every_kind() {
    Value v = make_container(Value::Kind::Array);
    v.items.push_back(Value{});
    v.items.push_back(make_bool(true));
    v.items.push_back(make_bool(false));
    for (const uint64_t u : {uint64_t{5}, uint64_t{200}, uint64_t{0x1234}, uint64_t{0x12345678},
                             uint64_t{0x123456789a}}) {
        v.items.push_back(make_uint(u));
    }
    for (const int64_t i :
         {int64_t{-5}, int64_t{-100}, int64_t{-1000}, int64_t{-100000}, int64_t{-10000000000}}) {
        v.items.push_back(make_int(i));
    }
    for (const size_t n : {size_t{0}, size_t{3}, size_t{40}, size_t{300}}) {
        v.items.push_back(make_str(std::string(n, 's')));
        v.items.push_back(make_bin(std::string(n, '\xbb')));
    }
    Value map = make_container(Value::Kind::Map);
    for (int k = 0; k < 17; ++k) {
        map.items.push_back(make_str("k" + std::to_string(k)));
        map.items.push_back(make_uint(static_cast<uint64_t>(k)));
    }
    v.items.push_back(map);
    Value big_array = make_container(Value::Kind::Array);
    big_array.items.assign(16, make_int(-1));
    v.items.push_back(big_array);
    return v;
}

TEST(MsgpackReader, EveryTruncationFailsCleanly) {
    const std::string full = encode_value(every_kind());
    ASSERT_EQ(decode_value(full), every_kind());
    {
        Reader r(full);
        EXPECT_TRUE(r.skip());
        EXPECT_TRUE(r.at_end());
    }
    for (size_t len = 0; len < full.size(); ++len) {
        SCOPED_TRACE(len);
        const ExactBuffer prefix(std::string_view(full).substr(0, len));
        Reader typed(prefix.view());
        EXPECT_EQ(read_value(typed), std::nullopt);
        EXPECT_FALSE(typed.ok());
        Reader skipping(prefix.view());
        EXPECT_FALSE(skipping.skip());
        EXPECT_FALSE(skipping.ok());
    }
}

TEST(MsgpackReader, TruncatedScalarsOfEveryWidthFail) {
    for (const char *h : {"cc80",
                          "cd0100",
                          "ce00010000",
                          "cf0000000100000000",
                          "d080",
                          "d18000",
                          "d280000000",
                          "d38000000000000000",
                          "a26869",
                          "d9026869",
                          "da00026869",
                          "db000000026869",
                          "c4026869",
                          "c500026869",
                          "c6000000026869",
                          "dc0001c0",
                          "dd00000001c0",
                          "de0001c0c0",
                          "df00000001c0c0",
                          "ca3f800000",
                          "cb3ff0000000000000",
                          "d40100",
                          "c7010500"}) {
        const std::string full = unhex(h);
        for (size_t len = 0; len < full.size(); ++len) {
            SCOPED_TRACE(std::string(h) + " cut to " + std::to_string(len));
            const ExactBuffer prefix(std::string_view(full).substr(0, len));
            for (const Read what :
                 {Read::UInt, Read::Int, Read::Str, Read::Bin, Read::Array, Read::Map}) {
                Reader r(prefix.view());
                const bool got = try_read(r, what);
                if (got && (what == Read::Array || what == Read::Map)) {
                    continue;  // a container header alone is complete
                }
                EXPECT_FALSE(got);
                EXPECT_FALSE(r.ok());
            }
            Reader r(prefix.view());
            EXPECT_FALSE(r.skip());
        }
        Reader r(full);
        EXPECT_TRUE(r.skip()) << h;
        EXPECT_TRUE(r.at_end()) << h;
    }
}

TEST(MsgpackReader, HugeDeclaredLengthsWithTinyDataFail) {
    for (const char *h : {"dbffffffff61", "daffff61", "d9ff61", "c6ffffffff61", "c5ffff61",
                          "c4ff61", "ddffffffffc0", "dfffffffffc0c0", "dcffffc0", "deffffc0c0",
                          "c9ffffffff0561", "c8ffff0561", "c7ff0561"}) {
        SCOPED_TRACE(h);
        const std::string bytes = unhex(h);
        const ExactBuffer buffer(bytes);
        Reader r(buffer.view());
        EXPECT_FALSE(r.skip());
        EXPECT_FALSE(r.ok());
        Reader str(buffer.view());
        EXPECT_EQ(str.read_str(), std::nullopt);
        Reader bin(buffer.view());
        EXPECT_EQ(bin.read_bin(), std::nullopt);
    }
    // The header of a huge container is readable by itself; the elements are not there.
    const std::string bytes = unhex("ddffffffffc0");
    Reader r(bytes);
    EXPECT_EQ(r.read_array(), 0xffffffffu);
    EXPECT_TRUE(r.read_nil());
    EXPECT_FALSE(r.read_nil());
}

// ---- skip() ----------------------------------------------------------------------------------

TEST(MsgpackSkip, NestedDataLandsOnTheNextValue) {
    const std::string nested = encode_value(every_kind());
    const std::string bytes = nested + unhex("a3656e64");  // followed by "end"
    Reader r(bytes);
    EXPECT_TRUE(r.skip());
    EXPECT_EQ(r.position(), nested.size());
    EXPECT_EQ(r.read_str(), "end");
    EXPECT_TRUE(r.at_end());
}

TEST(MsgpackSkip, FloatsAndExtensions) {
    const std::vector<std::pair<std::string, Type>> cases = {
        {"ca3f800000", Type::Float},                          // float32 1.0
        {"cb3ff0000000000000", Type::Float},                  // float64 1.0
        {"d4017f", Type::Ext},                                // fixext 1
        {"d5017f7f", Type::Ext},                              // fixext 2
        {"d6ff01020304", Type::Ext},                          // fixext 4 (timestamp32)
        {"d7ff0102030405060708", Type::Ext},                  // fixext 8
        {"d8010102030405060708090a0b0c0d0e0f10", Type::Ext},  // fixext 16
        {"c70005", Type::Ext},                                // ext 8, empty
        {"c70305616263", Type::Ext},                          // ext 8
        {"c8000305616263", Type::Ext},                        // ext 16
        {"c90000000305616263", Type::Ext},                    // ext 32
    };
    for (const auto &[h, type] : cases) {
        SCOPED_TRACE(h);
        const std::string value = unhex(h);
        const std::string bytes = value + unhex("c3");
        Reader r(bytes);
        EXPECT_EQ(r.peek_type(), type);
        EXPECT_TRUE(r.skip());
        EXPECT_EQ(r.position(), value.size());
        EXPECT_EQ(r.read_bool(), true);
        EXPECT_TRUE(r.at_end());
        EXPECT_TRUE(r.ok());
        // There is no typed reader for them: reading one as a scalar fails.
        Reader typed(value);
        EXPECT_EQ(typed.read_uint(), std::nullopt);
    }
    // Floats and extensions inside containers.
    const std::string bytes = unhex("92ca3f80000081a178d40100c0");
    Reader r(bytes);
    EXPECT_TRUE(r.skip());
    EXPECT_EQ(r.read_nil(), true);
    EXPECT_TRUE(r.at_end());
}

TEST(MsgpackSkip, ReservedMarkerFails) {
    const std::string bytes = unhex("91c1");
    Reader r(bytes);
    EXPECT_FALSE(r.skip());
    EXPECT_FALSE(r.ok());
}

// `levels` one-element arrays (or maps with an empty-string key) around a nil.
std::string nested(int levels, bool maps) {
    std::string out;
    for (int i = 0; i < levels; ++i) {
        out += maps ? unhex("81a0") : unhex("91");
    }
    return out + unhex("c0");
}

TEST(MsgpackSkip, DepthLimit) {
    static_assert(Reader::kMaxDepth == 32);
    for (const bool maps : {false, true}) {
        SCOPED_TRACE(maps ? "maps" : "arrays");
        const std::string at_limit_bytes = nested(32, maps);
        Reader at_limit(at_limit_bytes);
        EXPECT_TRUE(at_limit.skip());
        EXPECT_TRUE(at_limit.at_end());

        for (const int levels : {33, 34, 100}) {
            const std::string over_bytes = nested(levels, maps);
            Reader over(over_bytes);
            EXPECT_FALSE(over.skip()) << levels;
            EXPECT_FALSE(over.ok());
        }
    }
    // Deep enough to overflow the stack if recursion were unbounded.
    const std::string deep_bytes = nested(1'000'000, false);
    Reader deep(deep_bytes);
    EXPECT_FALSE(deep.skip());
}

TEST(MsgpackSkip, DepthIsPerPathNotPerValueCount) {
    // Many siblings at depth 32 are fine: the limit is on nesting, not on the number of values.
    std::string wide;
    for (int i = 0; i < 31; ++i) {
        wide += unhex("91");
    }
    wide += unhex("dc0100");
    for (int i = 0; i < 256; ++i) {
        wide += unhex("c0");
    }
    Reader r(wide);
    EXPECT_TRUE(r.skip());
    EXPECT_TRUE(r.at_end());
}

// ---- Cross-check against msgpack-cxx ---------------------------------------------------------

class Corpus {
  public:
    explicit Corpus(uint32_t seed) : rng_(seed) {}

    Value make(int depth) {
        const int pick = below(depth >= 3 ? 7 : 10);
        switch (pick) {
            case 0:
                return Value{};
            case 1:
                return make_bool(below(2) == 1);
            case 2:
            case 3:
                return make_uint(some_uint());
            case 4:
                return make_int(some_negative());
            case 5:
                return make_str(some_bytes());
            case 6:
                return make_bin(some_bytes());
            case 7:
            case 8: {
                Value v = make_container(Value::Kind::Array);
                const size_t n = some_count();
                for (size_t i = 0; i < n; ++i) {
                    v.items.push_back(make(depth + 1));
                }
                return v;
            }
            default: {
                Value v = make_container(Value::Kind::Map);
                const size_t n = some_count();
                for (size_t i = 0; i < n; ++i) {
                    // Keys are mostly strings, as in our protocol, but any value is legal.
                    v.items.push_back(below(4) == 0 ? make(depth + 1) : make_str(some_bytes()));
                    v.items.push_back(make(depth + 1));
                }
                return v;
            }
        }
    }

  private:
    uint32_t below(uint32_t n) { return std::uniform_int_distribution<uint32_t>(0, n - 1)(rng_); }
    uint64_t u64() { return (uint64_t{rng_()} << 32) | rng_(); }

    uint64_t some_uint() {
        static constexpr uint64_t kEdges[] = {
            0,       1,          0x7f,        0x80,      0xff,       0x100,     0xffff,
            0x10000, 0xffffffff, 0x100000000, INT64_MAX, 1ull << 63, UINT64_MAX};
        if (below(2) == 0) {
            return kEdges[below(std::size(kEdges))];
        }
        return u64() >> below(64);
    }

    int64_t some_negative() {
        static constexpr int64_t kEdges[] = {-1,
                                             -31,
                                             -32,
                                             -33,
                                             -127,
                                             -128,
                                             -129,
                                             -32767,
                                             -32768,
                                             -32769,
                                             INT32_MIN,
                                             INT32_MIN - 1LL,
                                             INT64_MIN + 1,
                                             INT64_MIN};
        if (below(2) == 0) {
            return kEdges[below(std::size(kEdges))];
        }
        return -static_cast<int64_t>(u64() >> (below(63) + 1)) - 1;
    }

    std::string some_bytes() {
        static constexpr size_t kEdges[] = {0, 1, 15, 31, 32, 33, 255, 256, 257};
        size_t n;
        const uint32_t roll = below(1000);
        if (roll < 2) {
            n = roll == 0 ? 65535 : 65536;  // the 16/32-bit length boundary, rarely
        } else if (roll < 300) {
            n = kEdges[below(std::size(kEdges))];
        } else {
            n = below(40);
        }
        std::string s(n, '\0');
        for (char &c : s) {
            c = static_cast<char>(below(256));
        }
        return s;
    }

    size_t some_count() {
        const uint32_t roll = below(20);
        if (roll == 0) {
            return 15 + below(3);  // the fixarray/fixmap boundary
        }
        return below(5);
    }

    std::mt19937 rng_;
};

void pack_cxx(::msgpack::packer<::msgpack::sbuffer> &pk, const Value &v) {
    switch (v.kind) {
        case Value::Kind::Nil:
            pk.pack_nil();
            break;
        case Value::Kind::Bool:
            v.b ? pk.pack_true() : pk.pack_false();
            break;
        case Value::Kind::UInt:
            pk.pack_uint64(v.u);
            break;
        case Value::Kind::Int:
            pk.pack_int64(v.i);
            break;
        case Value::Kind::Str:
            pk.pack_str(static_cast<uint32_t>(v.bytes.size()));
            pk.pack_str_body(v.bytes.data(), static_cast<uint32_t>(v.bytes.size()));
            break;
        case Value::Kind::Bin:
            pk.pack_bin(static_cast<uint32_t>(v.bytes.size()));
            pk.pack_bin_body(v.bytes.data(), static_cast<uint32_t>(v.bytes.size()));
            break;
        case Value::Kind::Array:
            pk.pack_array(static_cast<uint32_t>(v.items.size()));
            for (const Value &item : v.items) {
                pack_cxx(pk, item);
            }
            break;
        case Value::Kind::Map:
            pk.pack_map(static_cast<uint32_t>(v.items.size() / 2));
            for (const Value &item : v.items) {
                pack_cxx(pk, item);
            }
            break;
    }
}

std::string pack_cxx(const Value &v) {
    ::msgpack::sbuffer buffer;
    ::msgpack::packer<::msgpack::sbuffer> pk(&buffer);
    pack_cxx(pk, v);
    return std::string(buffer.data(), buffer.size());
}

// nullopt for the kinds Value does not model (floats, ext).
std::optional<Value> from_cxx(const ::msgpack::object &o) {
    namespace t = ::msgpack::type;
    switch (o.type) {
        case t::NIL:
            return Value{};
        case t::BOOLEAN:
            return make_bool(o.via.boolean);
        case t::POSITIVE_INTEGER:
            return make_uint(o.via.u64);
        case t::NEGATIVE_INTEGER:
            return make_int(o.via.i64);
        case t::STR:
            return make_str(std::string(o.via.str.ptr, o.via.str.size));
        case t::BIN:
            return make_bin(std::string(o.via.bin.ptr, o.via.bin.size));
        case t::ARRAY: {
            Value v = make_container(Value::Kind::Array);
            for (uint32_t i = 0; i < o.via.array.size; ++i) {
                std::optional<Value> item = from_cxx(o.via.array.ptr[i]);
                if (!item) {
                    return std::nullopt;
                }
                v.items.push_back(std::move(*item));
            }
            return v;
        }
        case t::MAP: {
            Value v = make_container(Value::Kind::Map);
            for (uint32_t i = 0; i < o.via.map.size; ++i) {
                std::optional<Value> key = from_cxx(o.via.map.ptr[i].key);
                std::optional<Value> val = from_cxx(o.via.map.ptr[i].val);
                if (!key || !val) {
                    return std::nullopt;
                }
                v.items.push_back(std::move(*key));
                v.items.push_back(std::move(*val));
            }
            return v;
        }
        default:
            return std::nullopt;
    }
}

constexpr int kCorpusSize = 3000;

TEST(MsgpackCrossCheck, WriterBytesEqualMsgpackCxxBytes) {
    // Both encoders pick the smallest encoding, so the bytes must agree exactly.
    Corpus corpus(20261125);
    for (int n = 0; n < kCorpusSize; ++n) {
        const Value v = corpus.make(0);
        const std::string ours = encode_value(v);
        const std::string theirs = pack_cxx(v);
        ASSERT_TRUE(ours == theirs) << "value #" << n << "\n ours:   " << hex(ours).substr(0, 200)
                                    << "\n theirs: " << hex(theirs).substr(0, 200);
    }
}

TEST(MsgpackCrossCheck, ReaderDecodesMsgpackCxxOutput) {
    Corpus corpus(4711);
    for (int n = 0; n < kCorpusSize; ++n) {
        const Value v = corpus.make(0);
        const std::string theirs = pack_cxx(v);
        ASSERT_EQ(decode_value(theirs), v) << "value #" << n << ": " << hex(theirs).substr(0, 200);
        Reader r(theirs);
        ASSERT_TRUE(r.skip()) << "value #" << n;
        ASSERT_TRUE(r.at_end()) << "value #" << n;
    }
}

TEST(MsgpackCrossCheck, MsgpackCxxDecodesWriterOutput) {
    Corpus corpus(31337);
    for (int n = 0; n < kCorpusSize; ++n) {
        const Value v = corpus.make(0);
        const std::string ours = encode_value(v);
        size_t offset = 0;
        const ::msgpack::object_handle handle = ::msgpack::unpack(ours.data(), ours.size(), offset);
        ASSERT_EQ(offset, ours.size()) << "value #" << n;
        ASSERT_EQ(from_cxx(handle.get()), v) << "value #" << n << ": " << hex(ours).substr(0, 200);
    }
}

TEST(MsgpackCrossCheck, SkipAgreesWithMsgpackCxxOnFloatsAndExtensions) {
    // A stream of values our typed reader does not model, each packed by msgpack-cxx; skip() must
    // stop exactly where msgpack-cxx's unpacker says the value ends.
    std::mt19937 rng(99);
    ::msgpack::sbuffer buffer;
    ::msgpack::packer<::msgpack::sbuffer> pk(&buffer);
    const uint32_t ext_sizes[] = {0, 1, 2, 3, 4, 5, 8, 9, 16, 17, 255, 256, 65535, 65536};
    for (int n = 0; n < 2000; ++n) {
        switch (rng() % 5) {
            case 0:
                pk.pack_float(static_cast<float>(rng()) / 7.0f);
                break;
            case 1:
                pk.pack_double(static_cast<double>(rng()) / 3.0);
                break;
            case 2: {
                const uint32_t size = ext_sizes[rng() % std::size(ext_sizes)];
                const std::string payload(size, static_cast<char>(rng()));
                pk.pack_ext(size, static_cast<int8_t>(rng()));
                pk.pack_ext_body(payload.data(), size);
                break;
            }
            case 3:
                // A container mixing them.
                pk.pack_array(3);
                pk.pack_double(0.5);
                pk.pack_map(1);
                pk.pack_float(1.5f);
                pk.pack_ext(2, 1);
                pk.pack_ext_body("xy", 2);
                pk.pack_int64(-static_cast<int64_t>(rng()));
                break;
            default:
                pk.pack_uint64(rng());
                break;
        }
    }
    const std::string stream(buffer.data(), buffer.size());
    Reader r(stream);
    size_t offset = 0;
    int values = 0;
    while (offset < stream.size()) {
        ::msgpack::unpack(stream.data(), stream.size(), offset);
        ASSERT_TRUE(r.skip()) << "value #" << values;
        ASSERT_EQ(r.position(), offset) << "value #" << values;
        ++values;
    }
    EXPECT_EQ(values, 2000);
    EXPECT_TRUE(r.at_end());
}

}  // namespace
}  // namespace ehrgate::msgpack
