package cache

import (
	"strings"
	"testing"
)

// order lists the chunks of l from least to most recently used, by the first
// byte of their keys, walking the list both ways.
func order(t *testing.T, l *lru) string {
	t.Helper()
	var fwd, back []byte
	for i := l.slots[0].prev; i != 0; i = l.slots[i].prev {
		fwd = append(fwd, l.slots[i].key[0])
	}
	for i := l.slots[0].next; i != 0; i = l.slots[i].next {
		back = append([]byte{l.slots[i].key[0]}, back...)
	}
	if string(fwd) != string(back) {
		t.Fatalf("list is %q one way and %q the other", fwd, back)
	}
	return string(fwd)
}

func TestLRU(t *testing.T) {
	tests := []struct {
		ops   string // "+a" add a (size 1), "=a" touch, "-a" remove
		order string // least recently used first
		bytes int64
		slots int // slots allocated, the head included
	}{
		{"", "", 0, 1},
		{"+a +b +c", "abc", 3, 4},
		{"+a +b +c =a", "bca", 3, 4},
		{"+a +b +c =c", "abc", 3, 4},
		{"+a +b +c =b =a", "cba", 3, 4},
		{"+a +b +c -b", "ac", 2, 4},
		{"+a +b +c -a -c", "b", 1, 4},
		{"+a +b +c -b +d", "acd", 3, 4},             // d reuses b's slot
		{"+a +b +c -a -b -c +d +e +f", "def", 3, 4}, // all slots reused
		{"+a -a +a =x -x", "a", 1, 2},
	}
	for _, tt := range tests {
		t.Run(tt.ops, func(t *testing.T) {
			l := newLRU(0)
			for _, op := range strings.Fields(tt.ops) {
				k := key{op[1]}
				switch op[0] {
				case '+':
					l.add(k, 1)
				case '=':
					l.touch(k)
				case '-':
					l.remove(k)
				}
			}
			if got := order(t, l); got != tt.order {
				t.Errorf("order %q, want %q", got, tt.order)
			}
			if l.bytes != tt.bytes || l.len() != len(tt.order) || len(l.slots) != tt.slots {
				t.Errorf("%d bytes, %d chunks, %d slots; want %d, %d, %d", l.bytes, l.len(), len(l.slots), tt.bytes, len(tt.order), tt.slots)
			}
			oldest, ok := l.oldest()
			if ok != (tt.order != "") || ok && oldest[0] != tt.order[0] {
				t.Errorf("oldest = %q, %v", oldest[0], ok)
			}
		})
	}
}
