// Command client is a statically linked TCP client for graft's seccomp-mode
// tests (tests/test_static_programs.py): Go makes its system calls directly,
// never through libc, so only seccomp mode can graft it.
//
//	client HOST:PORT MESSAGE
//
// It dials HOST:PORT, sends MESSAGE and a newline, and prints one JSON
// object: the reply line and the peer it got, or the error and its errno
// (0 when the error carries none), so that a test can compare the errno with
// the policy's exactly. It exits 0 on a reply, 1 otherwise.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"
)

type result struct {
	Reply  string `json:"reply,omitempty"`
	Remote string `json:"remote,omitempty"`
	Error  string `json:"error,omitempty"`
	Errno  int    `json:"errno"`
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: client HOST:PORT MESSAGE")
		os.Exit(2)
	}
	res := talk(os.Args[1], os.Args[2])
	out, _ := json.Marshal(res)
	fmt.Println(string(out))
	if res.Error != "" {
		os.Exit(1)
	}
}

func talk(addr, message string) result {
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return failed(err)
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		return failed(err)
	}
	if _, err := fmt.Fprintln(conn, message); err != nil {
		return failed(err)
	}
	reply, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return failed(err)
	}
	return result{Reply: reply, Remote: conn.RemoteAddr().String()}
}

func failed(err error) result {
	var errno syscall.Errno
	res := result{Error: err.Error()}
	if errors.As(err, &errno) {
		res.Errno = int(errno)
	}
	return res
}
