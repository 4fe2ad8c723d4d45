// Command server is a statically linked TCP server for graft's seccomp-mode
// tests (tests/test_static_programs.py), listening the way Go programs
// usually do: net.Listen("tcp", ":PORT").
//
//	server PORT
//
// Once it listens it prints "listening ADDR" (the test's readiness signal).
// For each connection it reads one line and answers "go-server: LINE", then
// closes; it serves until it is killed. A failed listen prints the error and
// its errno as "listen failed errno=N: ERR" and exits 1.
package main

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: server PORT")
		os.Exit(2)
	}
	ln, err := net.Listen("tcp", ":"+os.Args[1])
	if err != nil {
		var errno syscall.Errno
		errors.As(err, &errno)
		fmt.Printf("listen failed errno=%d: %v\n", int(errno), err)
		os.Exit(1)
	}
	fmt.Printf("listening %s\n", ln.Addr())
	for {
		conn, err := ln.Accept()
		if err != nil {
			fmt.Printf("accept failed: %v\n", err)
			os.Exit(1)
		}
		go serve(conn)
	}
}

func serve(conn net.Conn) {
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		return
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return
	}
	fmt.Fprintf(conn, "go-server: %s", line)
}
