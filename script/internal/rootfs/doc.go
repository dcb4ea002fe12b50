// Package rootfs builds Debian root filesystems for test and benchmark
// images, from the machine's apt mirror, and caches them: debootstrap's
// minbase variant, and children of it with packages installed by apt-get in
// a chroot on a copy, the way a Dockerfile's RUN line adds a layer, so that
// the difference between parent and child is what that step changed.
//
// It needs root, debootstrap and network access to the Debian archive. It
// does not build or push images; testimage.FromDir and FromDirDiff turn its
// trees into layers.
package rootfs
