// Package registry runs a real registry for lazylayer's end-to-end tests and
// benchmarks, and a fault-injecting proxy to put in front of it.
//
// [Start] runs Debian's docker-registry (distribution 2.8) as a child process
// on 127.0.0.1 with its storage, config and log in a directory the caller
// owns; [Registry.BlobPath] exposes a blob's file so a test can corrupt or
// truncate it, and [Registry.AccessLog] parses the requests it served.
// distribution's access log is in the combined log format: it shows method,
// path, status and size but not request headers, so a test that needs Range
// headers (or needs to make the registry fail) puts a [Proxy] in front.
//
// Callers own every process and listener they start: register Stop or Close
// with t.Cleanup right after starting. This package is not a registry
// implementation and does no authentication or TLS.
package registry
