package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/lazylayer/lazylayer/script/internal/testimage"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("mkimage", flag.ContinueOnError)
	reg := fs.String("registry", "127.0.0.1:5000", "registry `host:port` (plain HTTP)")
	ref := fs.String("image", "", "image `name:tag` to push (required)")
	kind := fs.String("kind", "busybox", "image kind: busybox, tricky or large")
	sizeMiB := fs.Int("size-mib", 200, "large: total size of the generated files in MiB")
	layers := fs.Int("layers", 4, "large: number of layers of generated files")
	tmp := fs.String("tmpdir", "", "directory to stage layer blobs in (default $TMPDIR)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *ref == "" || fs.NArg() != 0 {
		fs.Usage()
		return errors.New("-image is required and no arguments are taken")
	}
	var img testimage.Image
	switch *kind {
	case "busybox":
		img = testimage.Busybox()
	case "tricky":
		img = testimage.Tricky()
	case "large":
		if *sizeMiB <= 0 || *layers <= 0 {
			return fmt.Errorf("-size-mib and -layers must be positive")
		}
		img = testimage.Large(*sizeMiB, *layers)
	default:
		return fmt.Errorf("unknown -kind %q: want busybox, tricky or large", *kind)
	}
	p := testimage.Pusher{TempDir: *tmp}
	dgst, _, err := p.Push(ctx, *reg, *ref, img)
	if err != nil {
		return fmt.Errorf("push %s %s to %s: %w", *kind, *ref, *reg, err)
	}
	_, err = fmt.Fprintln(stdout, dgst)
	return err
}
