package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"

	"github.com/containerd/log"
	"github.com/sirupsen/logrus"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	c := &cli{stdout: os.Stdout, stderr: os.Stderr}
	code := c.exitCode(c.run(ctx, os.Args[1:]))
	stop()
	os.Exit(code)
}

// errUsage marks a command line the user has to correct. What is wrong, and
// the usage, have been printed already.
var errUsage = errors.New("usage error")

// cli is the lazylayer command with where its output goes.
type cli struct {
	stdout io.Writer // results, for scripts
	stderr io.Writer // progress, usage and errors
}

// command is one subcommand.
type command struct {
	run     func(ctx context.Context, args []string) error
	summary string // one line for "lazylayer help"
}

// commands lists the subcommands by name.
func (c *cli) commands() map[string]command {
	return map[string]command{
		"convert":  {c.convert, "convert an image's layers to eStargz or zstd:chunked and push it"},
		"profile":  {c.profile, "save the files containers opened from lazy layers, for other nodes to fetch at once"},
		"status":   {c.status, "list the layers the daemon holds: state, bytes fetched, FUSE mounts"},
		"populate": {c.populate, "start the background download of lazy layers now (--wait: until local)"},
	}
}

// run runs the subcommand args[0] with the rest of args.
func (c *cli) run(ctx context.Context, args []string) error {
	ctx = log.WithLogger(ctx, c.logger())
	if len(args) == 0 {
		c.usage(c.stderr)
		return errUsage
	}
	name, args := args[0], args[1:]
	switch name {
	case "help", "-h", "-help", "--help":
		return c.help(ctx, args)
	}
	cmd, ok := c.commands()[name]
	if !ok {
		fmt.Fprintf(c.stderr, "lazylayer: unknown command %q\n", name)
		c.usage(c.stderr)
		return errUsage
	}
	return cmd.run(ctx, args)
}

// help prints the usage of lazylayer, or of the command args[0], to stdout.
func (c *cli) help(ctx context.Context, args []string) error {
	if len(args) == 0 {
		c.usage(c.stdout)
		return nil
	}
	// A command prints its usage, to what is its stderr, when asked -h.
	quiet := &cli{stdout: io.Discard, stderr: c.stdout}
	cmd, ok := quiet.commands()[args[0]]
	if !ok {
		fmt.Fprintf(c.stderr, "lazylayer help: unknown command %q\n", args[0])
		return errUsage
	}
	if err := cmd.run(ctx, []string{"-h"}); !errors.Is(err, flag.ErrHelp) {
		return err
	}
	return nil
}

// logger returns the logger for library code that logs through ctx
// (containerd's log.G): warnings and errors only, on stderr.
func (c *cli) logger() *log.Entry {
	l := logrus.New()
	l.SetOutput(c.stderr)
	l.SetLevel(logrus.WarnLevel)
	return logrus.NewEntry(l)
}

// usage prints the list of commands.
func (c *cli) usage(w io.Writer) {
	cmds := c.commands()
	var b strings.Builder
	b.WriteString("usage: lazylayer COMMAND [flags] [args]\n\ncommands:\n")
	for _, name := range slices.Sorted(maps.Keys(cmds)) {
		fmt.Fprintf(&b, "  %-10s %s\n", name, cmds[name].summary)
	}
	b.WriteString("  help       show this, or a command's flags: lazylayer help COMMAND\n")
	_, _ = io.WriteString(w, b.String())
}

// flagSet returns a flag set for the command name whose usage shows the
// synopsis line and the description, then the flags. Errors and -h print
// on stderr.
func (c *cli) flagSet(name, synopsis, description string) *flag.FlagSet {
	fl := flag.NewFlagSet("lazylayer "+name, flag.ContinueOnError)
	fl.SetOutput(c.stderr)
	fl.Usage = func() {
		fmt.Fprintf(c.stderr, "usage: lazylayer %s %s\n\n%s\nflags:\n", name, synopsis, description)
		fl.PrintDefaults()
	}
	return fl
}

// parse parses args with fl; a bad command line gives errUsage, and -h
// gives flag.ErrHelp.
func parse(fl *flag.FlagSet, args []string) error {
	err := fl.Parse(args)
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return err
	default:
		return errUsage // flag printed the error and the usage
	}
}

// exitCode reports err on stderr (unless already reported) and returns the
// process's exit code: 0 for success or help, 2 for a bad command line, 1
// otherwise.
func (c *cli) exitCode(err error) int {
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		return 2
	}
	fmt.Fprintln(c.stderr, "lazylayer:", err)
	return 1
}
