package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:])
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "lazylayer-bench:", err)
		os.Exit(1)
	}
}

// options are the command line settings. The process inside the network
// namespace parses the same arguments as the one that created it.
type options struct {
	top      string        // repository root
	quick    bool          // the short variant for development
	images   []string      // image names, see catalogue
	profiles []string      // network profile names, see profiles
	modes    []string      // mode names, see allModes
	runs     int           // measured runs per image, profile and mode
	steady   bool          // measure steady-state reads
	cache    string        // cached root filesystems and registry storage
	work     string        // per-run state, logs and results.json
	docs     string        // where benchmarks.md and bench/*.png go
	report   string        // render this results file and measure nothing
	before   string        // an earlier results file to compare lazily started containers and lazy mounts with
	prepare  bool          // build and cache the images, measure nothing
	copyConv bool          // never run `lazylayer convert`
	quiet    time.Duration // how long to wait for a quiet machine before a run
	lazyTOML string        // prepended to lazylayer's configuration in measured runs
	disk     bool          // put the runs' state on a fresh ext4 with a journal (see disk.go)
	args     []string      // the arguments as given, for the report
}

func parseOptions(args []string) (options, error) {
	o := options{args: args}
	fs := flag.NewFlagSet("lazylayer-bench", flag.ContinueOnError)
	fs.StringVar(&o.top, "top", ".", "lazylayer repository root")
	fs.BoolVar(&o.quick, "quick", false, "short variant: python image, 3 runs (under 10 minutes)")
	images := fs.String("images", "", "comma-separated images: "+strings.Join(catalogueNames(), ", ")+" (default: all but large200; -quick: python)")
	profs := fs.String("profiles", "", "comma-separated network profiles: "+strings.Join(profileNames(), ", ")+" (default: all)")
	modes := fs.String("modes", "", "comma-separated modes: "+strings.Join(modeNames(), ", ")+" (default: all)")
	fs.IntVar(&o.runs, "runs", 0, "runs per image, profile and mode (default 5; -quick: 3)")
	fs.BoolVar(&o.steady, "steady", true, "measure steady-state reads after the image is local")
	fs.StringVar(&o.cache, "cache", "", "cache directory (default TOP/.tools/bench-cache)")
	fs.StringVar(&o.work, "work", "", "work directory, emptied first (default TOP/.run/bench)")
	fs.StringVar(&o.docs, "docs", "", "directory to write benchmarks.md and bench/*.png into (default TOP/docs; -quick: WORK/docs; \"-\" for none)")
	fs.StringVar(&o.report, "report", "", "render this results.json into -docs and measure nothing")
	fs.StringVar(&o.before, "before", "", "an earlier results.json: the report shows its lazily started containers and lazy mounts as the \"before\"")
	fs.BoolVar(&o.prepare, "prepare", false, "build and push the images, then stop")
	fs.DurationVar(&o.quiet, "quiet-wait", -1, "before each run, wait up to this long for the CPUs to be less than 25% busy (default 2m; -quick: 20s)")
	fs.StringVar(&o.lazyTOML, "lazylayer-toml", "", "TOML put at the top of lazylayer's configuration in every measured run, for analysis (e.g. 'log_level = \"trace\"' logs each on-demand request); the report's command line shows it")
	fs.BoolVar(&o.disk, "state-disk", true, "put the daemons' state on a fresh ext4 file system with a journal on a loop device, as on a node (false: on the work directory's file system)")
	fs.BoolVar(&o.copyConv, "no-convert", false, "push the gzip images as the converted ones even if bin/lazylayer exists")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() != 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	top, err := filepath.Abs(o.top)
	if err != nil {
		return o, err
	}
	o.top = top
	if _, err := os.Stat(filepath.Join(top, "script", "bench")); err != nil {
		return o, fmt.Errorf("-top %s is not the lazylayer repository: %w", top, err)
	}
	def := func(p *string, v string) {
		if *p == "" {
			*p = v
		}
	}
	def(&o.cache, filepath.Join(top, ".tools", "bench-cache"))
	def(&o.work, filepath.Join(top, ".run", "bench"))
	if o.quick {
		// A quick run is for development: it does not replace the
		// published figures unless asked to.
		def(&o.docs, filepath.Join(o.work, "docs"))
	}
	def(&o.docs, filepath.Join(top, "docs"))
	if o.quiet < 0 {
		o.quiet = 2 * time.Minute
		if o.quick {
			o.quiet = 20 * time.Second
		}
	}
	if o.runs == 0 {
		o.runs = 5
		if o.quick {
			o.runs = 3
		}
	}
	if o.runs < 1 {
		return o, errors.New("-runs must be at least 1")
	}
	if *images == "" {
		*images = "python,gcc,synthetic"
		if o.quick {
			*images = "python"
		}
	}
	if o.images, err = pickNames("image", *images, catalogueNames()); err != nil {
		return o, err
	}
	def(profs, strings.Join(profileNames(), ","))
	if o.profiles, err = pickNames("profile", *profs, profileNames()); err != nil {
		return o, err
	}
	def(modes, strings.Join(modeNames(), ","))
	if o.modes, err = pickNames("mode", *modes, modeNames()); err != nil {
		return o, err
	}
	return o, nil
}

// pickNames splits a comma-separated list and checks every name is known.
func pickNames(what, list string, known []string) ([]string, error) {
	var out []string
	for n := range strings.SplitSeq(list, ",") {
		n = strings.TrimSpace(n)
		if n == "" {
			continue
		}
		if !slices.Contains(known, n) {
			return nil, fmt.Errorf("unknown %s %q: want one of %s", what, n, strings.Join(known, ", "))
		}
		if !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no %s selected", what)
	}
	return out, nil
}

func run(ctx context.Context, args []string) error {
	o, err := parseOptions(args)
	if err != nil {
		return err
	}
	if o.report != "" {
		res, err := loadResults(o.report)
		if err != nil {
			return err
		}
		before, err := o.loadBefore()
		if err != nil {
			return err
		}
		return writeDocs(o.docs, filepath.Join(o.top, "docs", "benchmarks.md"), res, before)
	}
	if os.Geteuid() != 0 {
		return errors.New("needs root: it runs containerd, mounts overlays and creates a network namespace")
	}
	if ns := os.Getenv(innerEnv); ns != "" {
		return runInner(ctx, o, ns)
	}
	return runOuter(ctx, o)
}

// loadBefore loads the -before results, or returns nil without them.
func (o options) loadBefore() (*results, error) {
	if o.before == "" {
		return nil, nil
	}
	return loadResults(o.before)
}
