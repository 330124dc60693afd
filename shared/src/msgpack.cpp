#include "ehrgate/msgpack.hpp"

#include <limits>

namespace ehrgate::msgpack {

void Writer::put_be(uint64_t v, int bytes) {
    for (int shift = (bytes - 1) * 8; shift >= 0; shift -= 8) {
        put_u8(static_cast<uint8_t>(v >> shift));
    }
}

void Writer::nil() {
    put_u8(0xc0);
}

void Writer::boolean(bool value) {
    put_u8(value ? 0xc3 : 0xc2);
}

void Writer::uint(uint64_t value) {
    if (value <= 0x7f) {
        put_u8(static_cast<uint8_t>(value));
    } else if (value <= 0xff) {
        put_u8(0xcc);
        put_be(value, 1);
    } else if (value <= 0xffff) {
        put_u8(0xcd);
        put_be(value, 2);
    } else if (value <= 0xffffffffULL) {
        put_u8(0xce);
        put_be(value, 4);
    } else {
        put_u8(0xcf);
        put_be(value, 8);
    }
}

void Writer::sint(int64_t value) {
    if (value >= 0) {
        uint(static_cast<uint64_t>(value));
        return;
    }
    if (value >= -32) {
        put_u8(static_cast<uint8_t>(value));
    } else if (value >= std::numeric_limits<int8_t>::min()) {
        put_u8(0xd0);
        put_be(static_cast<uint64_t>(value), 1);
    } else if (value >= std::numeric_limits<int16_t>::min()) {
        put_u8(0xd1);
        put_be(static_cast<uint64_t>(value), 2);
    } else if (value >= std::numeric_limits<int32_t>::min()) {
        put_u8(0xd2);
        put_be(static_cast<uint64_t>(value), 4);
    } else {
        put_u8(0xd3);
        put_be(static_cast<uint64_t>(value), 8);
    }
}

void Writer::str(std::string_view value) {
    const size_t n = value.size();
    if (n <= 31) {
        put_u8(static_cast<uint8_t>(0xa0 | n));
    } else if (n <= 0xff) {
        put_u8(0xd9);
        put_be(n, 1);
    } else if (n <= 0xffff) {
        put_u8(0xda);
        put_be(n, 2);
    } else {
        put_u8(0xdb);
        put_be(n, 4);
    }
    out_.append(value);
}

void Writer::bin(std::string_view value) {
    const size_t n = value.size();
    if (n <= 0xff) {
        put_u8(0xc4);
        put_be(n, 1);
    } else if (n <= 0xffff) {
        put_u8(0xc5);
        put_be(n, 2);
    } else {
        put_u8(0xc6);
        put_be(n, 4);
    }
    out_.append(value);
}

void Writer::array(uint32_t count) {
    if (count <= 15) {
        put_u8(static_cast<uint8_t>(0x90 | count));
    } else if (count <= 0xffff) {
        put_u8(0xdc);
        put_be(count, 2);
    } else {
        put_u8(0xdd);
        put_be(count, 4);
    }
}

void Writer::map(uint32_t count) {
    if (count <= 15) {
        put_u8(static_cast<uint8_t>(0x80 | count));
    } else if (count <= 0xffff) {
        put_u8(0xde);
        put_be(count, 2);
    } else {
        put_u8(0xdf);
        put_be(count, 4);
    }
}

bool Reader::need(size_t n) {
    if (failed_ || data_.size() - pos_ < n) {
        failed_ = true;
        return false;
    }
    return true;
}

uint64_t Reader::take_be(int bytes) {
    uint64_t v = 0;
    for (int i = 0; i < bytes; ++i) {
        v = (v << 8) | static_cast<uint8_t>(data_[pos_++]);
    }
    return v;
}

std::optional<std::string_view> Reader::take_span(size_t n) {
    if (!need(n)) {
        return std::nullopt;
    }
    std::string_view span = data_.substr(pos_, n);
    pos_ += n;
    return span;
}

Type Reader::peek_type() const {
    if (failed_ || at_end()) {
        return Type::Invalid;
    }
    const uint8_t b = static_cast<uint8_t>(data_[pos_]);
    if (b <= 0x7f)
        return Type::UInt;
    if (b <= 0x8f)
        return Type::Map;
    if (b <= 0x9f)
        return Type::Array;
    if (b <= 0xbf)
        return Type::Str;
    if (b >= 0xe0)
        return Type::Int;
    switch (b) {
        case 0xc0:
            return Type::Nil;
        case 0xc2:
        case 0xc3:
            return Type::Bool;
        case 0xc4:
        case 0xc5:
        case 0xc6:
            return Type::Bin;
        case 0xc7:
        case 0xc8:
        case 0xc9:
        case 0xd4:
        case 0xd5:
        case 0xd6:
        case 0xd7:
        case 0xd8:
            return Type::Ext;
        case 0xca:
        case 0xcb:
            return Type::Float;
        case 0xcc:
        case 0xcd:
        case 0xce:
        case 0xcf:
            return Type::UInt;
        case 0xd0:
        case 0xd1:
        case 0xd2:
        case 0xd3:
            return Type::Int;
        case 0xd9:
        case 0xda:
        case 0xdb:
            return Type::Str;
        case 0xdc:
        case 0xdd:
            return Type::Array;
        case 0xde:
        case 0xdf:
            return Type::Map;
        default:
            return Type::Invalid;  // 0xc1 is never used
    }
}

bool Reader::read_nil() {
    if (!need(1) || static_cast<uint8_t>(data_[pos_]) != 0xc0) {
        failed_ = true;
        return false;
    }
    ++pos_;
    return true;
}

std::optional<bool> Reader::read_bool() {
    if (!need(1)) {
        return std::nullopt;
    }
    const uint8_t b = static_cast<uint8_t>(data_[pos_]);
    if (b != 0xc2 && b != 0xc3) {
        failed_ = true;
        return std::nullopt;
    }
    ++pos_;
    return b == 0xc3;
}

std::optional<int64_t> Reader::read_int() {
    if (!need(1)) {
        return std::nullopt;
    }
    const uint8_t b = static_cast<uint8_t>(data_[pos_]);
    if (b <= 0x7f) {
        ++pos_;
        return b;
    }
    if (b >= 0xe0) {
        ++pos_;
        return static_cast<int8_t>(b);
    }
    int width = 0;
    bool is_signed = false;
    switch (b) {
        case 0xcc:
            width = 1;
            break;
        case 0xcd:
            width = 2;
            break;
        case 0xce:
            width = 4;
            break;
        case 0xcf:
            width = 8;
            break;
        case 0xd0:
            width = 1;
            is_signed = true;
            break;
        case 0xd1:
            width = 2;
            is_signed = true;
            break;
        case 0xd2:
            width = 4;
            is_signed = true;
            break;
        case 0xd3:
            width = 8;
            is_signed = true;
            break;
        default:
            failed_ = true;
            return std::nullopt;
    }
    if (!need(1 + static_cast<size_t>(width))) {
        return std::nullopt;
    }
    ++pos_;
    const uint64_t raw = take_be(width);
    if (!is_signed) {
        if (raw > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
            failed_ = true;
            return std::nullopt;
        }
        return static_cast<int64_t>(raw);
    }
    // Sign-extend from the encoded width.
    const int shift = 64 - width * 8;
    return static_cast<int64_t>(raw << shift) >> shift;
}

std::optional<uint64_t> Reader::read_uint() {
    if (!need(1)) {
        return std::nullopt;
    }
    if (static_cast<uint8_t>(data_[pos_]) == 0xcf) {
        // The one encoding whose full range does not fit read_int().
        if (!need(9)) {
            return std::nullopt;
        }
        ++pos_;
        return take_be(8);
    }
    const std::optional<int64_t> v = read_int();
    if (!v || *v < 0) {
        failed_ = true;
        return std::nullopt;
    }
    return static_cast<uint64_t>(*v);
}

std::optional<std::string_view> Reader::read_str() {
    if (!need(1)) {
        return std::nullopt;
    }
    const uint8_t b = static_cast<uint8_t>(data_[pos_]);
    size_t len = 0;
    if ((b & 0xe0) == 0xa0) {
        ++pos_;
        len = b & 0x1f;
    } else if (b >= 0xd9 && b <= 0xdb) {
        const int width = b == 0xd9 ? 1 : (b == 0xda ? 2 : 4);
        if (!need(1 + static_cast<size_t>(width))) {
            return std::nullopt;
        }
        ++pos_;
        len = take_be(width);
    } else {
        failed_ = true;
        return std::nullopt;
    }
    return take_span(len);
}

std::optional<std::string_view> Reader::read_bin() {
    if (!need(1)) {
        return std::nullopt;
    }
    const uint8_t b = static_cast<uint8_t>(data_[pos_]);
    if (b < 0xc4 || b > 0xc6) {
        failed_ = true;
        return std::nullopt;
    }
    const int width = b == 0xc4 ? 1 : (b == 0xc5 ? 2 : 4);
    if (!need(1 + static_cast<size_t>(width))) {
        return std::nullopt;
    }
    ++pos_;
    return take_span(take_be(width));
}

std::optional<uint32_t> Reader::read_array() {
    if (!need(1)) {
        return std::nullopt;
    }
    const uint8_t b = static_cast<uint8_t>(data_[pos_]);
    if ((b & 0xf0) == 0x90) {
        ++pos_;
        return b & 0x0f;
    }
    if (b != 0xdc && b != 0xdd) {
        failed_ = true;
        return std::nullopt;
    }
    const int width = b == 0xdc ? 2 : 4;
    if (!need(1 + static_cast<size_t>(width))) {
        return std::nullopt;
    }
    ++pos_;
    return static_cast<uint32_t>(take_be(width));
}

std::optional<uint32_t> Reader::read_map() {
    if (!need(1)) {
        return std::nullopt;
    }
    const uint8_t b = static_cast<uint8_t>(data_[pos_]);
    if ((b & 0xf0) == 0x80) {
        ++pos_;
        return b & 0x0f;
    }
    if (b != 0xde && b != 0xdf) {
        failed_ = true;
        return std::nullopt;
    }
    const int width = b == 0xde ? 2 : 4;
    if (!need(1 + static_cast<size_t>(width))) {
        return std::nullopt;
    }
    ++pos_;
    return static_cast<uint32_t>(take_be(width));
}

bool Reader::skip() {
    return skip_at_depth(0);
}

bool Reader::skip_at_depth(int depth) {
    if (depth > kMaxDepth) {
        failed_ = true;
        return false;
    }
    switch (peek_type()) {
        case Type::Nil:
            return read_nil();
        case Type::Bool:
            return read_bool().has_value();
        case Type::UInt:
            return read_uint().has_value();
        case Type::Int:
            return read_int().has_value();
        case Type::Str:
            return read_str().has_value();
        case Type::Bin:
            return read_bin().has_value();
        case Type::Float: {
            const size_t width = static_cast<uint8_t>(data_[pos_]) == 0xca ? 4 : 8;
            return take_span(1 + width).has_value();
        }
        case Type::Ext: {
            const uint8_t b = static_cast<uint8_t>(data_[pos_]);
            size_t payload = 0;
            size_t header = 2;  // marker + type byte
            if (b >= 0xd4 && b <= 0xd8) {
                payload = size_t{1} << (b - 0xd4);
            } else {
                const int width = b == 0xc7 ? 1 : (b == 0xc8 ? 2 : 4);
                if (!need(1 + static_cast<size_t>(width))) {
                    return false;
                }
                ++pos_;
                payload = take_be(width);
                header = 1;  // the type byte remains
            }
            return take_span(header + payload).has_value();
        }
        case Type::Array: {
            const std::optional<uint32_t> n = read_array();
            for (uint32_t i = 0; n && i < *n; ++i) {
                if (!skip_at_depth(depth + 1)) {
                    return false;
                }
            }
            return n.has_value();
        }
        case Type::Map: {
            const std::optional<uint32_t> n = read_map();
            for (uint32_t i = 0; n && i < *n; ++i) {
                if (!skip_at_depth(depth + 1) || !skip_at_depth(depth + 1)) {
                    return false;
                }
            }
            return n.has_value();
        }
        case Type::Invalid:
            failed_ = true;
            return false;
    }
    return false;
}

bool read_string_list(Reader &r, std::vector<std::string> &out, uint32_t max) {
    const std::optional<uint32_t> count = r.read_array();
    if (!count || *count > max) {
        r.fail();
        return false;
    }
    for (uint32_t i = 0; i < *count; ++i) {
        const std::optional<std::string_view> value = r.read_str();
        if (!value) {
            return false;
        }
        out.emplace_back(*value);
    }
    return true;
}

}  // namespace ehrgate::msgpack
