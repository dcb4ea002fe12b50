package main

import (
	"context"
	"fmt"
	"os"
	"slices"

	"github.com/lazylayer/lazylayer/script/internal/rootfs"
)

// rootfsDir returns where the root filesystem name is cached.
func rootfsDir(cache, name string) string { return rootfs.Dir(cache, name) }

// prepareRootfs builds the root filesystems the selected images need and
// are not cached yet.
func prepareRootfs(ctx context.Context, o options) error {
	var need []string
	for _, name := range o.images {
		for _, r := range catalogue(name).rootfs {
			if !slices.Contains(need, r) {
				need = append(need, r)
			}
		}
	}
	if len(need) == 0 {
		return nil
	}
	mirror, err := rootfs.Mirror()
	if err != nil {
		return err
	}
	for _, name := range need {
		if _, err := rootfs.Ensure(ctx, o.cache, name, mirror); err != nil {
			return err
		}
	}
	return nil
}

// removeTree unmounts anything below dir and removes it.
func removeTree(dir string) error {
	if err := unmountUnder(dir); err != nil {
		return err
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove %s: %w", dir, err)
	}
	return nil
}
