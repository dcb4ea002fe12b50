package registry

import (
	"regexp"
	"strconv"
	"time"
)

// accessLineRE matches a combined-log-format line as gorilla/handlers writes
// it for distribution:
//
//	127.0.0.1 - - [26/Nov/2026:16:27:01 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
var accessLineRE = regexp.MustCompile(`^(\S+) \S+ \S+ \[([^\]]+)\] "(\S+) (\S+) [^"]*" (\d{3}) (\d+|-) "((?:[^"\\]|\\.)*)" "((?:[^"\\]|\\.)*)"$`)

func parseAccessLine(line string) (AccessEntry, bool) {
	m := accessLineRE.FindStringSubmatch(line)
	if m == nil {
		return AccessEntry{}, false
	}
	e := AccessEntry{Remote: m[1], Method: m[3], URI: m[4], Referer: m[7], UserAgent: m[8]}
	e.Time, _ = time.Parse("02/Jan/2006:15:04:05 -0700", m[2])
	e.Status, _ = strconv.Atoi(m[5])
	if m[6] != "-" {
		e.Size, _ = strconv.ParseInt(m[6], 10, 64)
	}
	return e, true
}
