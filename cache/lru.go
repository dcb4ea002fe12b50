package cache

// lru is a Store's index: the chunks on disk, their sizes, and their order of
// last use. Its entries live in one slice and link to each other by position,
// not by pointer, so the garbage collector never scans the index however many
// chunks it holds. An lru is not safe for concurrent use; Store.mu guards it.
type lru struct {
	index map[key]int32 // chunk → its slot
	// slots[0] is the head of a circular list: its next is the most recently
	// used chunk and its prev the least recently used. Free slots are chained
	// through next, starting at free.
	slots []slot
	free  int32 // first free slot; 0 when there is none
	bytes int64 // total size of the indexed chunks
}

type slot struct {
	key        key
	size       int64
	prev, next int32
}

func newLRU(capacity int) *lru {
	return &lru{
		index: make(map[key]int32, capacity),
		slots: make([]slot, 1, capacity+1),
	}
}

// len returns the number of indexed chunks.
func (l *lru) len() int { return len(l.index) }

// lookup returns the size of chunk k, if it is indexed, without recording a use.
func (l *lru) lookup(k key) (size int64, ok bool) {
	i, ok := l.index[k]
	if !ok {
		return 0, false
	}
	return l.slots[i].size, true
}

// touch returns the size of chunk k, if it is indexed, and records a use of it.
func (l *lru) touch(k key) (size int64, ok bool) {
	i, ok := l.index[k]
	if !ok {
		return 0, false
	}
	l.unlink(i)
	l.pushFront(i)
	return l.slots[i].size, true
}

// add indexes chunk k as the most recently used. k must not be indexed.
func (l *lru) add(k key, size int64) {
	i := l.free
	if i != 0 {
		l.free = l.slots[i].next
	} else {
		l.slots = append(l.slots, slot{})
		i = int32(len(l.slots) - 1)
	}
	l.slots[i] = slot{key: k, size: size}
	l.pushFront(i)
	l.index[k] = i
	l.bytes += size
}

// remove drops chunk k from the index and returns its size.
func (l *lru) remove(k key) (size int64, ok bool) {
	i, ok := l.index[k]
	if !ok {
		return 0, false
	}
	size = l.slots[i].size
	l.unlink(i)
	delete(l.index, k)
	l.slots[i] = slot{next: l.free}
	l.free = i
	l.bytes -= size
	return size, true
}

// oldest returns the least recently used chunk.
func (l *lru) oldest() (k key, ok bool) {
	i := l.slots[0].prev
	if i == 0 {
		return key{}, false
	}
	return l.slots[i].key, true
}

func (l *lru) unlink(i int32) {
	prev, next := l.slots[i].prev, l.slots[i].next
	l.slots[prev].next = next
	l.slots[next].prev = prev
}

func (l *lru) pushFront(i int32) {
	first := l.slots[0].next
	l.slots[i].prev = 0
	l.slots[i].next = first
	l.slots[first].prev = i
	l.slots[0].next = i
}
