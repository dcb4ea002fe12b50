package main

import (
	"context"
	"fmt"
	"os"

	"github.com/opencontainers/go-digest"

	"github.com/lazylayer/lazylayer/fs/layer/layerstatus"
	"github.com/lazylayer/lazylayer/fs/lazy"
)

// profile saves the access profiles of the daemon's lazy layers.
func (c *cli) profile(ctx context.Context, args []string) error {
	fl := c.flagSet("profile", "save [--address SOCKET] DIR",
		"Writes the access profile of each lazy layer the daemon holds into DIR, one\n"+
			"file per layer (sha256-<hex>.json): the files containers opened while the\n"+
			"layer was lazy, first opened first, with the layer's blob and TOC digests.\n"+
			"A daemon whose lazy.profile_dir holds a layer's profile fetches those files\n"+
			"right after it mounts the layer, on any node. A profile already in DIR for\n"+
			"a layer is replaced; layers no file was opened from are left out.\n")
	address := fl.String("address", defaultAddress, "the daemon's snapshot API socket (status.sock sits next to it)")
	save := len(args) > 0 && args[0] == "save"
	if save {
		args = args[1:]
	}
	if err := parse(fl, args); err != nil {
		return err
	}
	if !save {
		fmt.Fprintln(c.stderr, "lazylayer profile: the one subcommand is save")
		fl.Usage()
		return errUsage
	}
	if fl.NArg() != 1 {
		fmt.Fprintln(c.stderr, "lazylayer profile save: name one directory")
		fl.Usage()
		return errUsage
	}
	dir := fl.Arg(0)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	report, err := layerstatus.NewClient(layerstatus.Address(*address)).Layers(ctx, true)
	if err != nil {
		return err
	}
	saved := 0
	for _, l := range report.Layers {
		if l.TOC == "" || len(l.Accessed) == 0 {
			continue
		}
		p := lazy.Profile{Layer: digest.Digest(l.Digest), TOC: digest.Digest(l.TOC), Files: l.Accessed}
		if err := lazy.WriteProfile(dir, p); err != nil {
			return err
		}
		fmt.Fprintf(c.stdout, "%s\t%d files\n", lazy.ProfileName(p.Layer), len(p.Files))
		saved++
	}
	fmt.Fprintf(c.stderr, "%d profile(s) written to %s\n", saved, dir)
	return nil
}
