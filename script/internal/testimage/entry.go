package testimage

import (
	"archive/tar"
	"fmt"
	"io"
	"path"
	"time"
)

// Type is the kind of a tar entry. Its values are the tar typeflags.
type Type byte

// The entry types a layer can hold.
const (
	TypeReg      Type = tar.TypeReg
	TypeDir      Type = tar.TypeDir
	TypeSymlink  Type = tar.TypeSymlink
	TypeHardlink Type = tar.TypeLink
	TypeChar     Type = tar.TypeChar
	TypeBlock    Type = tar.TypeBlock
	TypeFIFO     Type = tar.TypeFifo
)

// DefaultModTime returns the modification time written for entries whose
// ModTime is zero: 2024-01-02T03:04:05Z. Images built by this package never
// depend on the current time, so pushing the same spec twice gives the same
// digests.
func DefaultModTime() time.Time {
	return time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)
}

// Entry describes one tar entry completely. It is written as a PAX-format
// header with exactly these fields; nothing is added or normalised.
type Entry struct {
	// Name is the entry's path inside the layer, written verbatim: usually
	// relative without a leading slash, directories with a trailing slash.
	// Any bytes are allowed (a Go string need not be UTF-8), as are names a
	// safe extractor must reject ("../x", "/etc/x").
	Name string
	// Type is the kind of entry.
	Type Type
	// Mode holds the permission bits and the setuid (04000), setgid (02000)
	// and sticky (01000) bits, as for chmod. It holds no file type bits.
	Mode int64
	// Uid and Gid are the numeric owner and group.
	Uid, Gid int
	// ModTime is the modification time, kept to the nanosecond. The zero
	// value means DefaultModTime.
	ModTime time.Time
	// Linkname is the target of a symlink, or for a hardlink the Name of an
	// earlier entry in the same layer.
	Linkname string
	// Devmajor and Devminor are the device numbers of a char or block node.
	Devmajor, Devminor int64
	// Xattrs are extended attributes, written as PAX SCHILY.xattr.<name>
	// records. Values may hold any bytes; avoid empty values, which PAX
	// defines as "unset" and readers may drop.
	Xattrs map[string]string
	// Content is the content of a regular file, when Body is nil.
	Content []byte
	// Body, if not nil, produces the content of a regular file instead of
	// Content. Use it for big or generated files: it is streamed.
	Body Body
}

// File returns a regular file entry owned by root with the given content.
func File(name string, mode int64, content string) Entry {
	return Entry{Name: name, Type: TypeReg, Mode: mode, Content: []byte(content)}
}

// BigFile returns a regular file entry owned by root whose content body
// produces.
func BigFile(name string, mode int64, body Body) Entry {
	return Entry{Name: name, Type: TypeReg, Mode: mode, Body: body}
}

// Dir returns a directory entry owned by root. A trailing slash is added to
// name if it has none.
func Dir(name string, mode int64) Entry {
	if name != "" && name[len(name)-1] != '/' {
		name += "/"
	}
	return Entry{Name: name, Type: TypeDir, Mode: mode}
}

// Symlink returns a symlink entry owned by root pointing to target.
func Symlink(name, target string) Entry {
	return Entry{Name: name, Type: TypeSymlink, Mode: 0o777, Linkname: target}
}

// Hardlink returns a hardlink entry to target, which must be the Name of an
// earlier entry in the same layer.
func Hardlink(name, target string) Entry {
	return Entry{Name: name, Type: TypeHardlink, Linkname: target}
}

// Whiteout returns the entry that deletes name (and everything under it)
// from the layers below: an empty regular file ".wh.<base>" next to it.
func Whiteout(name string) Entry {
	dir, base := path.Split(name)
	return Entry{Name: dir + ".wh." + base, Type: TypeReg}
}

// Opaque returns the entry that hides everything the layers below hold under
// directory dir: an empty regular file "<dir>/.wh..wh..opq". The caller lists
// dir's own entry before it, as image builders do.
func Opaque(dir string) Entry {
	if dir != "" && dir[len(dir)-1] != '/' {
		dir += "/"
	}
	return Entry{Name: dir + ".wh..wh..opq", Type: TypeReg}
}

// WriteTar writes entries to w as a tar stream, in order, and ends the
// archive. Regular files get their content from Body or Content; every other
// type is written with size 0.
func WriteTar(w io.Writer, entries []Entry) error {
	tw := tar.NewWriter(w)
	for i := range entries {
		if err := writeEntry(tw, &entries[i]); err != nil {
			return fmt.Errorf("tar entry %q: %w", entries[i].Name, err)
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("end tar archive: %w", err)
	}
	return nil
}

func writeEntry(tw *tar.Writer, e *Entry) error {
	h := &tar.Header{
		Typeflag: byte(e.Type),
		Name:     e.Name,
		Linkname: e.Linkname,
		Mode:     e.Mode,
		Uid:      e.Uid,
		Gid:      e.Gid,
		ModTime:  e.ModTime,
		Devmajor: e.Devmajor,
		Devminor: e.Devminor,
		Format:   tar.FormatPAX,
	}
	if h.ModTime.IsZero() {
		h.ModTime = DefaultModTime()
	}
	if len(e.Xattrs) > 0 {
		h.PAXRecords = make(map[string]string, len(e.Xattrs))
		for k, v := range e.Xattrs {
			h.PAXRecords["SCHILY.xattr."+k] = v
		}
	}
	if e.Type != TypeReg {
		if e.Body != nil || len(e.Content) > 0 {
			return fmt.Errorf("content on a non-regular entry of type %q", e.Type)
		}
		return tw.WriteHeader(h)
	}
	if e.Body == nil {
		h.Size = int64(len(e.Content))
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		_, err := tw.Write(e.Content)
		return err
	}
	r, size, err := e.Body.Open()
	if err != nil {
		return fmt.Errorf("open body: %w", err)
	}
	defer r.Close()
	h.Size = size
	if err := tw.WriteHeader(h); err != nil {
		return err
	}
	n, err := io.Copy(tw, r)
	if err != nil {
		return fmt.Errorf("copy body: %w", err)
	}
	if n != size {
		return fmt.Errorf("body gave %d bytes, want %d", n, size)
	}
	return nil
}
