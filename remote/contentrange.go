package remote

import (
	"fmt"
	"strconv"
	"strings"
)

// parseContentRange parses the Content-Range header of a 206 reply,
// "bytes first-last/size" or "bytes first-last/*" (RFC 9110, 14.4). size is -1
// when the registry does not say. It also accepts "bytes=", which some servers
// send.
func parseContentRange(s string) (first, last, size int64, err error) {
	bad := func() (int64, int64, int64, error) {
		return 0, 0, 0, fmt.Errorf("invalid Content-Range %q", printable(s))
	}
	rest, ok := strings.CutPrefix(s, "bytes ")
	if !ok {
		if rest, ok = strings.CutPrefix(s, "bytes="); !ok {
			return bad()
		}
	}
	rng, total, ok := strings.Cut(rest, "/")
	if !ok {
		return bad()
	}
	a, b, ok := strings.Cut(rng, "-")
	if !ok {
		return bad()
	}
	if first, ok = parseCount(a); !ok {
		return bad()
	}
	if last, ok = parseCount(b); !ok || last < first {
		return bad()
	}
	size = -1
	if total != "*" {
		if size, ok = parseCount(total); !ok || last >= size {
			return bad()
		}
	}
	return first, last, size, nil
}

// parseCount parses a non-negative decimal without sign or spaces.
func parseCount(s string) (int64, bool) {
	if s == "" || strings.Trim(s, "0123456789") != "" {
		return 0, false
	}
	n, err := strconv.ParseInt(s, 10, 64)
	return n, err == nil
}
