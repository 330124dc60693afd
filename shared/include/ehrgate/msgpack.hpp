// A small MessagePack codec for the module <-> policyd protocol.
//
// Why not msgpack-cxx on the data path: its unpacker throws on malformed input and allocates a
// zone per message. The nginx worker must never throw across the C boundary and should not
// allocate per field, so this reader works in place over the received bytes, never throws, and
// enforces a nesting limit. msgpack-cxx is still used by the unit tests as an independent
// reference implementation for cross-checking.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace ehrgate::msgpack {

enum class Type : uint8_t { Nil, Bool, UInt, Int, Float, Str, Bin, Array, Map, Ext, Invalid };

// Appends encoded values to a caller-owned string. Always uses the smallest encoding, so encoded
// bytes are canonical and golden-byte tests are stable.
class Writer {
  public:
    explicit Writer(std::string &out) : out_(out) {}

    void nil();
    void boolean(bool value);
    void uint(uint64_t value);
    void sint(int64_t value);
    void str(std::string_view value);
    void bin(std::string_view value);
    void array(uint32_t count);
    void map(uint32_t count);

    // Convenience for the common "string key followed by a value" pattern in maps.
    void key(std::string_view name) { str(name); }

  private:
    void put_u8(uint8_t v) { out_.push_back(static_cast<char>(v)); }
    void put_be(uint64_t v, int bytes);

    std::string &out_;
};

// Pull reader over a byte range. Errors are sticky: after the first malformed or unexpected
// value every read returns std::nullopt and ok() is false, so callers can decode a whole message
// and check once at the end.
class Reader {
  public:
    static constexpr int kMaxDepth = 32;

    explicit Reader(std::string_view data) : data_(data) {}

    bool ok() const { return !failed_; }
    bool at_end() const { return pos_ >= data_.size(); }
    size_t position() const { return pos_; }

    Type peek_type() const;

    bool read_nil();
    std::optional<bool> read_bool();
    // Accepts any non-negative integer encoding (positive fixint, uint*, or non-negative int*).
    std::optional<uint64_t> read_uint();
    std::optional<int64_t> read_int();
    std::optional<std::string_view> read_str();
    std::optional<std::string_view> read_bin();
    std::optional<uint32_t> read_array();
    std::optional<uint32_t> read_map();

    // Skips one complete value (recursively), bounded by kMaxDepth.
    bool skip();

    void fail() { failed_ = true; }

  private:
    bool need(size_t n);
    uint64_t take_be(int bytes);
    std::optional<std::string_view> take_span(size_t n);
    bool skip_at_depth(int depth);

    std::string_view data_;
    size_t pos_ = 0;
    bool failed_ = false;
};

// Reads an array of at most `max` strings, appending them to `out`. A longer array fails the
// reader; nothing is reserved up front, since the count is untrusted until the elements are
// actually there.
bool read_string_list(Reader &r, std::vector<std::string> &out, uint32_t max);

// Reads a map with string keys, calling on_field(index) for each key listed in `keys` (the
// reader is then at its value) and skipping the others, so newer peers can add fields. A known
// key given twice fails the reader (which of the two counts would be a guess), as does a field
// of `required` (a bit mask over `keys`) that is missing.
template <size_t N, typename OnField>
bool read_fields(Reader &r, const std::array<std::string_view, N> &keys, uint32_t required,
                 OnField &&on_field) {
    static_assert(N <= 32);
    const std::optional<uint32_t> count = r.read_map();
    if (!count) {
        return false;
    }
    uint32_t seen = 0;
    for (uint32_t i = 0; i < *count; ++i) {
        const std::optional<std::string_view> key = r.read_str();
        if (!key) {
            return false;
        }
        const auto known = std::find(keys.begin(), keys.end(), *key);
        if (known == keys.end()) {
            if (!r.skip()) {
                return false;
            }
            continue;
        }
        const uint32_t bit = uint32_t{1} << (known - keys.begin());
        if ((seen & bit) != 0 || !on_field(static_cast<size_t>(known - keys.begin())) || !r.ok()) {
            r.fail();
            return false;
        }
        seen |= bit;
    }
    if ((seen & required) != required) {
        r.fail();
        return false;
    }
    return r.ok();
}

}  // namespace ehrgate::msgpack
