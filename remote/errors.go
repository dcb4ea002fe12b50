package remote

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"unicode"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	remoteerrors "github.com/containerd/containerd/v2/core/remotes/errors"
)

// ErrUnavailable means the bytes could not be fetched: the registry could not
// be reached, kept failing (5xx, 429) or stalling after all retries, refused
// authorization (401, 403), or does not have the content (404). The bytes were
// not wrong; another source may have them.
var ErrUnavailable = errors.New("remote: registry unavailable")

// ErrBadData means the registry replied with something wrong: a body longer or
// shorter than the descriptor says, a Content-Range other than the one asked
// for, a manifest whose bytes do not match its digest or do not decode.
var ErrBadData = errors.New("remote: bad data from registry")

// errNoProgress marks a request that neither answered nor delivered a byte for
// Options.Timeout.
var errNoProgress = errors.New("no progress")

// errRangeIgnored is returned internally when a ranged GET was answered with
// the whole blob (HTTP 200) where the caller wants to fall back instead.
var errRangeIgnored = errors.New("registry ignored the Range header")

// op names a request for error messages: "fetch sha256:… from host/repo range 0-9".
type op struct {
	what   string // e.g. "fetch sha256:…" or "fetch manifest sha256:…"
	detail string // printed after the host and repository, e.g. " range 0-9"
}

// hostFailure is the last failure one registry host gave for a request.
type hostFailure struct {
	host      string // registry host as configured, e.g. "127.0.0.1:5000"
	err       error
	attempts  int
	transient bool // retrying may help
}

// requestError reports a request that failed on every host it was sent to.
type requestError struct {
	op       op
	repo     string
	failures []hostFailure // in host order; only hosts that were asked
	kind     error         // ErrUnavailable or ErrBadData
}

func (e *requestError) Error() string {
	var b strings.Builder
	b.WriteString(e.op.what)
	for i, f := range e.failures {
		if i > 0 {
			b.WriteString(";")
		}
		fmt.Fprintf(&b, " from %s/%s", f.host, e.repo)
		if i == 0 {
			b.WriteString(e.op.detail)
		}
		fmt.Fprintf(&b, ": %v", f.err)
		if f.attempts > 1 {
			fmt.Fprintf(&b, " (after %d attempts)", f.attempts)
		}
	}
	fmt.Fprintf(&b, ": %v", e.kind)
	return b.String()
}

// Unwrap gives the sentinel and each host's cause, so errors.Is finds both.
func (e *requestError) Unwrap() []error {
	errs := []error{e.kind}
	for _, f := range e.failures {
		errs = append(errs, f.err)
	}
	return errs
}

// newError reports one failure from one host.
func newError(o op, repo, host string, kind, err error, attempts int) error {
	return &requestError{
		op:       o,
		repo:     repo,
		failures: []hostFailure{{host: host, err: err, attempts: attempts}},
		kind:     kind,
	}
}

// statusError is an HTTP status the request cannot use.
type statusError struct {
	code   int
	detail string // the registry's error code and message, if it sent any
}

func (e *statusError) Error() string {
	if e.detail == "" {
		return fmt.Sprintf("HTTP %d", e.code)
	}
	return fmt.Sprintf("HTTP %d (%s)", e.code, e.detail)
}

// newStatusError describes resp's status and the first error of the registry's
// error body (distribution spec: {"errors":[{"code":…,"message":…}]}). It does
// not close the body.
func newStatusError(resp *http.Response) *statusError {
	var reply struct {
		Errors []struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"errors"`
	}
	e := &statusError{code: resp.StatusCode}
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if json.Unmarshal(b, &reply) == nil && len(reply.Errors) > 0 {
		e.detail = printable(reply.Errors[0].Code + ": " + reply.Errors[0].Message)
	}
	return e
}

// printable shortens s and drops characters that do not belong in a log line:
// the text comes from the registry.
func printable(s string) string {
	s = strings.Map(func(r rune) rune {
		if unicode.IsGraphic(r) {
			return r
		}
		return -1
	}, strings.ToValidUTF8(s, ""))
	if len(s) > 120 {
		s = strings.ToValidUTF8(s[:120], "") + "…"
	}
	return s
}

// permanentError marks a failure that retrying will not fix.
type permanentError struct{ err error }

func (e *permanentError) Error() string { return e.err.Error() }
func (e *permanentError) Unwrap() error { return e.err }

// isTransient reports whether retrying the request may succeed: connection
// errors, stalls, 429 and 5xx are transient; 4xx, certificate and
// authorization failures are not.
func isTransient(err error) bool {
	if se, ok := errors.AsType[*statusError](err); ok {
		return transientStatus(se.code)
	}
	if us, ok := errors.AsType[remoteerrors.ErrUnexpectedStatus](err); ok {
		return transientStatus(us.StatusCode)
	}
	if _, ok := errors.AsType[*permanentError](err); ok {
		return false
	}
	if errors.Is(err, docker.ErrInvalidAuthorization) {
		return false
	}
	if _, ok := errors.AsType[*tls.CertificateVerificationError](err); ok {
		return false
	}
	if _, ok := errors.AsType[x509.UnknownAuthorityError](err); ok {
		return false
	}
	if _, ok := errors.AsType[x509.HostnameError](err); ok {
		return false
	}
	if _, ok := errors.AsType[x509.CertificateInvalidError](err); ok {
		return false
	}
	return true
}

func transientStatus(code int) bool {
	return code == http.StatusTooManyRequests || code >= 500
}

// errClosed is returned by reads after Close.
var errClosed = errors.New("remote: read after Close")
