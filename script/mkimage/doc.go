// Command mkimage builds one of lazylayer's sample images and pushes it to a
// registry over plain HTTP, printing the manifest digest on stdout. The demo
// and the benchmarks use it.
//
//	mkimage -registry 127.0.0.1:5000 -image NAME:TAG -kind busybox|tricky|large [-size-mib 200] [-layers 4]
//
// The kinds are those of package testimage: busybox (small, multi-layer),
// tricky (the fidelity image, about 130 MiB) and large (a base layer plus
// -layers layers of generated files totalling -size-mib MiB).
package main
