package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"text/tabwriter"

	"github.com/opencontainers/go-digest"

	"github.com/lazylayer/lazylayer/fs/layer/layerstatus"
	"github.com/lazylayer/lazylayer/fs/lazy"
)

// defaultAddress is the daemon's default snapshot API socket.
const defaultAddress = "/run/lazylayer/lazylayer.sock"

// status asks a running lazylayer-snapshotter for its layers.
func (c *cli) status(ctx context.Context, args []string) error {
	fl := c.flagSet("status", "[--address SOCKET] [--json] [--accessed]",
		"Lists every layer the daemon holds: its digest, its state (lazy, populating,\n"+
			"local or failed; \"held\" while it waits for lazylayer populate), bytes held of\n"+
			"its compressed size, population's rate, for a FUSE mount still alive its\n"+
			"mountpoint and how many overlays use it, and the layers fetched ahead.\n")
	address := fl.String("address", defaultAddress, "the daemon's snapshot API socket (status.sock sits next to it)")
	asJSON := fl.Bool("json", false, "print JSON for scripts")
	accessed := fl.Bool("accessed", false, "print the files containers opened while layers were lazy, one per line, first\nopened first: a list for lazylayer convert --prioritize")
	if err := parse(fl, args); err != nil {
		return err
	}
	if fl.NArg() != 0 {
		fmt.Fprintln(c.stderr, "lazylayer status: takes no arguments")
		fl.Usage()
		return errUsage
	}
	report, err := layerstatus.NewClient(layerstatus.Address(*address)).Layers(ctx, *accessed)
	if err != nil {
		return err
	}
	layers := report.Layers
	if *accessed && !*asJSON {
		seen := map[string]bool{}
		for _, l := range layers {
			for _, p := range l.Accessed {
				if !seen[p] {
					seen[p] = true
					fmt.Fprintln(c.stdout, p)
				}
			}
		}
		return nil
	}
	if *asJSON {
		enc := json.NewEncoder(c.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(report)
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DIGEST\tSTATE\tFETCHED\tRATE\tUSERS\tMOUNTPOINT")
	for _, l := range layers {
		fetched, rate := "complete", "-"
		if l.Size > 0 {
			fetched = fmt.Sprintf("%s / %s (%d%%)", humanSize(l.Held), humanSize(l.Size), 100*l.Held/l.Size)
		}
		if l.State == layerstatus.StatePopulating && l.Rate > 0 {
			rate = humanSize(int64(l.Rate)) + "/s"
		}
		state := l.State
		if l.HeldBack && l.State == layerstatus.StateLazy {
			state = "lazy (held)"
		}
		users, mp := "-", "-"
		if l.Mountpoint != "" {
			users, mp = fmt.Sprint(l.Users), l.Mountpoint
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", shortDigest(digest.Digest(l.Digest)), state, fetched, rate, users, mp)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, l := range layers {
		if l.Error != "" {
			fmt.Fprintf(c.stdout, "%s: %s\n", shortDigest(digest.Digest(l.Digest)), l.Error)
		}
		if l.View != "" && l.View != lazy.ViewExact && l.State != layerstatus.StateLocal {
			fmt.Fprintf(c.stdout, "%s: lazy view is %s\n", shortDigest(digest.Digest(l.Digest)), l.View)
		}
	}
	if sg := report.Staging; sg.Layers > 0 {
		fmt.Fprintf(c.stdout, "staging: %d layer(s) fetched ahead, %s on disk (limit %s compressed)\n",
			sg.Layers, humanSize(sg.Bytes), humanSize(sg.Limit))
	}
	return nil
}

// populate starts the background download of lazy layers now, whatever
// the daemon's population policy.
func (c *cli) populate(ctx context.Context, args []string) error {
	fl := c.flagSet("populate", "[--address SOCKET] [--wait] DIGEST|--all",
		"Starts the background download of a lazy layer (or of every lazy layer the\n"+
			"daemon holds) now. Under the manual population policy (lazy.populate =\n"+
			"\"manual\") layers stay lazy until this says; under auto it skips the delay.\n")
	address := fl.String("address", defaultAddress, "the daemon's snapshot API socket (status.sock sits next to it)")
	all := fl.Bool("all", false, "every lazy layer the daemon holds now")
	wait := fl.Bool("wait", false, "return once the layers are local; fail if one cannot be")
	if err := parse(fl, args); err != nil {
		return err
	}
	if *all == (fl.NArg() == 1) || fl.NArg() > 1 {
		fmt.Fprintln(c.stderr, "lazylayer populate: name one layer digest, or --all")
		fl.Usage()
		return errUsage
	}
	dgst := ""
	if !*all {
		d, err := digest.Parse(fl.Arg(0))
		if err != nil {
			fmt.Fprintf(c.stderr, "lazylayer populate: %q is not a digest: %v\n", fl.Arg(0), err)
			return errUsage
		}
		dgst = d.String()
	}
	res, err := layerstatus.NewClient(layerstatus.Address(*address)).Populate(ctx, dgst, *wait)
	if err != nil {
		return err
	}
	fmt.Fprintf(c.stderr, "population started for %d layer(s)\n", res.Released)
	if res.Error != "" {
		return errors.New(res.Error)
	}
	if *wait {
		fmt.Fprintln(c.stderr, "local")
	}
	return nil
}
