package remote

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"unicode"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	remoteerrors "github.com/containerd/containerd/v2/core/remotes/errors"
)

// ErrUnavailable means the bytes could not be fetched: the registry could not
// be reached, kept failing (5xx, 429) or stalling after all retries, or
// refused authorization (401, 403). The bytes were not wrong; another source
// may have them.
var ErrUnavailable = errors.New("remote: registry unavailable")

// ErrNotFound means that every registry host asked answered 404: the
// registry is up and does not have the manifest or blob (a wrong tag, digest
// or repository, or content deleted since). Such a request is not retried.
var ErrNotFound = errors.New("remote: not found")

// ErrUnauthorized is matched (with errors.Is), along with ErrUnavailable,
// by the error of a request a registry host refused with 401 or 403: no
// credentials, or not the right ones.
var ErrUnauthorized = errors.New("remote: unauthorized")

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
	kind     error         // ErrUnavailable, ErrNotFound or ErrBadData
}

// Error says each failure once, with the hosts that gave it: "fetch … from
// a/repo, b/repo range 0-9: HTTP 404 (…): remote: not found".
func (e *requestError) Error() string {
	type group struct {
		hosts []string
		what  string // the failure, with its attempts
	}
	var groups []group
	for _, f := range e.failures {
		what := fmt.Sprint(f.err)
		if f.attempts > 1 {
			what += fmt.Sprintf(" (after %d attempts)", f.attempts)
		}
		host := f.host + "/" + e.repo
		i := slices.IndexFunc(groups, func(g group) bool { return g.what == what })
		switch {
		case i < 0:
			groups = append(groups, group{hosts: []string{host}, what: what})
		case !slices.Contains(groups[i].hosts, host):
			groups[i].hosts = append(groups[i].hosts, host)
		}
	}
	var b strings.Builder
	b.WriteString(e.op.what)
	for i, g := range groups {
		if i > 0 {
			b.WriteString(";")
		}
		fmt.Fprintf(&b, " from %s", strings.Join(g.hosts, ", "))
		if i == 0 {
			b.WriteString(e.op.detail)
		}
		fmt.Fprintf(&b, ": %s", g.what)
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

// Is makes a 401 or 403 reply match ErrUnauthorized.
func (e *statusError) Is(target error) bool {
	return target == ErrUnauthorized && (e.code == http.StatusUnauthorized || e.code == http.StatusForbidden)
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

// authFailure makes err, an authorizer's, match ErrUnauthorized when the
// registry or its token server refused the credentials (401, 403).
func authFailure(err error) error {
	us, ok := errors.AsType[remoteerrors.ErrUnexpectedStatus](err)
	if ok && (us.StatusCode == http.StatusUnauthorized || us.StatusCode == http.StatusForbidden) ||
		errors.Is(err, docker.ErrInvalidAuthorization) {
		return fmt.Errorf("%w (%w)", err, ErrUnauthorized)
	}
	return err
}

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

// failureKind is what a request that failed on every host failed with:
// ErrNotFound if every host answered 404, else ErrUnavailable.
func failureKind(failures []hostFailure) error {
	for _, f := range failures {
		if se, ok := errors.AsType[*statusError](f.err); !ok || se.code != http.StatusNotFound {
			return ErrUnavailable
		}
	}
	return ErrNotFound
}

// errClosed is returned by reads after Close.
var errClosed = errors.New("remote: read after Close")
