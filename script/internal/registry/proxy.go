package registry

import (
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"time"
)

// Proxy is a reverse proxy on 127.0.0.1 in front of a registry that records
// every request (method, path, Range header, status, bytes served) and can
// inject faults: error statuses, responses cut short, delays, and refused
// connections. Point the client under test at Proxy.Addr instead of the
// registry. Close it with Close.
type Proxy struct {
	srv       *http.Server
	transport *http.Transport
	serving   sync.WaitGroup // one per Serve goroutine

	mu       sync.Mutex
	addr     string                // guarded by mu; fixed after NewProxy
	ln       net.Listener          // guarded by mu; nil while refusing
	conns    map[net.Conn]struct{} // guarded by mu: open client connections
	requests []*Request            // guarded by mu; records are updated under mu too
	faults   []pendingFault        // guarded by mu: applied in order
	closed   bool                  // guarded by mu
	// The hold (HoldAfter): requests whose path contains holdPath wait
	// once passes is 0; holdChanged is closed and replaced when the hold
	// changes; holding counts the waiting requests. All guarded by mu.
	holdPath    string
	holdOn      bool
	passes      int
	holdChanged chan struct{}
	holding     int
}

// Request is what the proxy recorded about one request.
type Request struct {
	Method string
	Path   string // URL path, without the query
	Range  string // the Range header, "" if none
	Status int    // status sent to the client; 0 if none (yet)
	Bytes  int64  // response body bytes sent to the client
	Fault  bool   // a Fault was applied
	Held   bool   // the request waited at the hold (HoldAfter)
}

// Fault describes a misbehaviour to apply to matching requests.
type Fault struct {
	// Method and Path select requests: Method must equal the request's
	// method, Path must be a substring of its URL path. Empty matches all.
	Method, Path string
	// Status, if not 0, is answered instead of forwarding the request.
	Status int
	// CutAfter, if > 0, forwards the request but closes the connection
	// after that many response body bytes.
	CutAfter int64
	// Delay is waited before handling the request.
	Delay time.Duration
}

type pendingFault struct {
	Fault
	left int // requests still to affect
}

// NewProxy starts a proxy on 127.0.0.1 (a free port) forwarding to the
// registry at target (host:port, or an http:// URL). The Host header is
// passed through, so the registry's Location headers point at the proxy.
func NewProxy(target string) (*Proxy, error) {
	if !strings.Contains(target, "://") {
		target = "http://" + target
	}
	u, err := url.Parse(target)
	if err != nil {
		return nil, fmt.Errorf("proxy target %q: %w", target, err)
	}
	p := &Proxy{
		transport:   &http.Transport{Proxy: nil, MaxIdleConnsPerHost: 16},
		conns:       make(map[net.Conn]struct{}),
		holdChanged: make(chan struct{}),
	}
	quiet := log.New(io.Discard, "", 0)
	rp := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(u)
			r.Out.Host = r.In.Host
		},
		Transport: p.transport,
		ErrorLog:  quiet,
	}
	p.srv = &http.Server{
		Handler:   p.handler(rp),
		ErrorLog:  quiet,
		ConnState: p.trackConn,
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("proxy listen: %w", err)
	}
	p.addr = ln.Addr().String()
	p.serve(ln)
	return p, nil
}

// serve records ln as the listener and serves it. The caller holds p.mu or
// is the only user of p.
func (p *Proxy) serve(ln net.Listener) {
	p.ln = ln
	p.serving.Add(1)
	go func() {
		defer p.serving.Done()
		p.srv.Serve(ln) // returns when ln is closed
	}()
}

func (p *Proxy) trackConn(c net.Conn, s http.ConnState) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch s {
	case http.StateNew:
		p.conns[c] = struct{}{}
	case http.StateClosed, http.StateHijacked:
		delete(p.conns, c)
	}
}

// Addr returns the proxy's host:port.
func (p *Proxy) Addr() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.addr
}

// Inject applies f to the next n requests it matches.
func (p *Proxy) Inject(f Fault, n int) {
	if n <= 0 {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.faults = append(p.faults, pendingFault{Fault: f, left: n})
}

// FailNext answers the next n requests with status instead of forwarding
// them.
func (p *Proxy) FailNext(n, status int) {
	p.Inject(Fault{Status: status}, n)
}

// ClearFaults drops all faults not yet applied.
func (p *Proxy) ClearFaults() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.faults = nil
}

// takeFault returns the first pending fault matching r, consuming one use.
func (p *Proxy) takeFault(r *http.Request) (Fault, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i := range p.faults {
		f := &p.faults[i]
		if (f.Method != "" && f.Method != r.Method) || !strings.Contains(r.URL.Path, f.Path) {
			continue
		}
		got := f.Fault
		if f.left--; f.left == 0 {
			p.faults = append(p.faults[:i], p.faults[i+1:]...)
		}
		return got, true
	}
	return Fault{}, false
}

// HoldAfter lets the next n requests whose URL path contains path through
// and holds every later one, unanswered, until a later HoldAfter lets it
// through, Release, or its client leaves. A client's retry is a request
// of its own. A test holds a download part-way with it: the requests
// held are the state it waits for, not a delay.
func (p *Proxy) HoldAfter(path string, n int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.holdPath, p.holdOn, p.passes = path, true, n
	close(p.holdChanged)
	p.holdChanged = make(chan struct{})
}

// Release lets every held request through and holds no more.
func (p *Proxy) Release() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.holdOn = false
	close(p.holdChanged)
	p.holdChanged = make(chan struct{})
}

// Holding returns how many requests wait at the hold now.
func (p *Proxy) Holding() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.holding
}

// hold waits while the hold keeps r, and reports false if its client
// left meanwhile.
func (p *Proxy) hold(r *http.Request, rec *Request) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.holdOn || !strings.Contains(r.URL.Path, p.holdPath) {
		return true
	}
	for p.holdOn && p.passes == 0 {
		rec.Held = true
		changed := p.holdChanged
		p.holding++
		p.mu.Unlock()
		select {
		case <-changed:
		case <-r.Context().Done():
		}
		p.mu.Lock()
		p.holding--
		if r.Context().Err() != nil {
			return false
		}
	}
	if p.holdOn {
		p.passes--
	}
	return true
}

// Refuse closes the listening socket and every open connection, so new
// connections are refused (ECONNREFUSED) until Accept.
func (p *Proxy) Refuse() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln == nil {
		return nil
	}
	err := p.ln.Close()
	p.ln = nil
	for c := range p.conns {
		c.Close()
	}
	if err != nil {
		return fmt.Errorf("close proxy listener: %w", err)
	}
	return nil
}

// Accept listens again on the same address after Refuse.
func (p *Proxy) Accept() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return errors.New("proxy closed")
	}
	if p.ln != nil {
		return nil
	}
	ln, err := net.Listen("tcp", p.addr)
	if err != nil {
		return fmt.Errorf("proxy listen again on %s: %w", p.addr, err)
	}
	p.serve(ln)
	return nil
}

// Requests returns a copy of the requests recorded so far, in the order
// they arrived. A request still being answered shows what was sent so far.
func (p *Proxy) Requests() []Request {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]Request, len(p.requests))
	for i, r := range p.requests {
		out[i] = *r
	}
	return out
}

// Reset forgets the recorded requests.
func (p *Proxy) Reset() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.requests = nil
}

// PathStats sums up the recorded requests for one path.
type PathStats struct {
	Requests int
	Bytes    int64    // response body bytes sent
	Ranges   []string // Range headers of the requests that had one, in order
}

// Stats returns the recorded requests summed up per URL path.
func (p *Proxy) Stats() map[string]PathStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[string]PathStats)
	for _, r := range p.requests {
		s := out[r.Path]
		s.Requests++
		s.Bytes += r.Bytes
		if r.Range != "" {
			s.Ranges = append(s.Ranges, r.Range)
		}
		out[r.Path] = s
	}
	return out
}

// Close stops the proxy: closes its listener and connections and waits for
// its goroutines.
func (p *Proxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	p.ln = nil
	p.mu.Unlock()
	err := p.srv.Close()
	p.serving.Wait()
	p.transport.CloseIdleConnections()
	if err != nil {
		return fmt.Errorf("close proxy: %w", err)
	}
	return nil
}

// begin records a new request and returns its record, which the handler
// keeps up to date through update.
func (p *Proxy) begin(r Request) *Request {
	p.mu.Lock()
	defer p.mu.Unlock()
	rec := &r
	p.requests = append(p.requests, rec)
	return rec
}

// update applies f to rec under p.mu.
func (p *Proxy) update(rec *Request, f func(*Request)) {
	p.mu.Lock()
	defer p.mu.Unlock()
	f(rec)
}

// handler records each request and applies faults around next. The record
// is updated before each status and body write reaches the client, so a
// client that has its response finds it counted.
func (p *Proxy) handler(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f, faulted := p.takeFault(r)
		rec := p.begin(Request{Method: r.Method, Path: r.URL.Path, Range: r.Header.Get("Range"), Fault: faulted})
		if !p.hold(r, rec) {
			return // the client left: no status
		}
		cw := &countingWriter{ResponseWriter: w, limit: f.CutAfter, p: p, rec: rec}
		if f.Delay > 0 {
			t := time.NewTimer(f.Delay)
			select {
			case <-t.C:
			case <-r.Context().Done():
				t.Stop()
				return // the client left: no status
			}
		}
		if f.Status != 0 {
			http.Error(cw, "lazylayer proxy: injected fault", f.Status)
			return
		}
		next.ServeHTTP(cw, r)
	})
}

var errCut = errors.New("lazylayer proxy: response cut")

// countingWriter keeps rec's Status and Bytes up to date and, if limit > 0,
// fails writes past limit bytes (the reverse proxy then aborts the
// connection).
type countingWriter struct {
	http.ResponseWriter
	p           *Proxy
	rec         *Request
	wroteHeader bool
	n           int64 // body bytes written
	limit       int64
}

func (w *countingWriter) WriteHeader(code int) {
	if !w.wroteHeader {
		w.wroteHeader = true
		w.p.update(w.rec, func(r *Request) { r.Status = code })
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *countingWriter) Write(b []byte) (int, error) {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	cut := false
	if w.limit > 0 && w.n+int64(len(b)) > w.limit {
		b, cut = b[:w.limit-w.n], true
	}
	// Count first, correct after a short write.
	w.p.update(w.rec, func(r *Request) { r.Bytes += int64(len(b)) })
	n, err := w.ResponseWriter.Write(b)
	w.n += int64(n)
	if n < len(b) {
		w.p.update(w.rec, func(r *Request) { r.Bytes -= int64(len(b) - n) })
	}
	if err == nil && cut {
		if f, ok := w.ResponseWriter.(http.Flusher); ok {
			f.Flush()
		}
		err = errCut
	}
	return n, err
}

// Unwrap lets http.ResponseController reach the underlying writer.
func (w *countingWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
